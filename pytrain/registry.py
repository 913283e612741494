"""Name -> builder registries, as InternLM's: MODEL_INITIALIZER maps config.model_type to a model builder.

@MODEL_INITIALIZER.register_module(module_name="NEW_MODEL")
def build_new_model_with_cfg(*args, **kwargs): ...

The built-in model families (pytrain.specs) register themselves when pytrain.specs is imported; MODEL_INITIALIZER
imports it at its first lookup, so every caller (config validation, initialize_model, --dry_run) sees them.
"""

import importlib
from collections.abc import Callable


class Registry:
    def __init__(self, name: str, builtins: str | None = None):
        """`builtins`: a module whose import registers the built-in entries, imported at the first lookup."""
        self.name = name
        self._modules: dict[str, Callable] = {}
        self._builtins = builtins

    def register_module(self, module_name: str | None = None, module: Callable | None = None):
        """Registers `module` under module_name (default: its __name__); used bare it is a decorator."""

        def register(obj: Callable) -> Callable:
            name = module_name or obj.__name__
            if name in self._modules:
                raise KeyError(
                    f"{self.name}: {name!r} is already registered (by {self._modules[name]!r}); "
                    f"pick another module_name"
                )
            self._modules[name] = obj
            return obj

        return register if module is None else register(module)

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # once: the import itself registers
            try:
                importlib.import_module(module)
            except BaseException:
                self._builtins = module  # the next lookup shows the same import error again
                raise

    def get_module(self, module_name: str) -> Callable:
        self._load_builtins()
        if module_name not in self._modules:
            known = ", ".join(sorted(self._modules)) or "none"
            raise KeyError(f"{self.name}: no module registered as {module_name!r}; registered: {known}")
        return self._modules[module_name]

    def has(self, module_name: str) -> bool:
        self._load_builtins()
        return module_name in self._modules

    def __contains__(self, module_name: str) -> bool:
        return self.has(module_name)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._modules)

    def unregister(self, module_name: str) -> Callable:
        """Removes and returns a registered entry (tests registering builders of their own clean up with it)."""
        self._load_builtins()
        if module_name not in self._modules:
            raise KeyError(f"{self.name}: no module registered as {module_name!r}")
        return self._modules.pop(module_name)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {sorted(self._modules)})"


MODEL_INITIALIZER = Registry("MODEL_INITIALIZER", builtins="pytrain.specs")
