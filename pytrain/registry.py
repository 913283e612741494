"""Name -> builder registries, as InternLM's: MODEL_INITIALIZER maps config.model_type to a model builder.

@MODEL_INITIALIZER.register_module(module_name="NEW_MODEL")
def build_new_model_with_cfg(*args, **kwargs): ...
"""

from collections.abc import Callable


class Registry:
    def __init__(self, name: str):
        self.name = name
        self._modules: dict[str, Callable] = {}

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

    def get_module(self, module_name: str) -> Callable:
        if module_name not in self._modules:
            known = ", ".join(sorted(self._modules)) or "none"
            raise KeyError(f"{self.name}: no module registered as {module_name!r}; registered: {known}")
        return self._modules[module_name]

    def has(self, module_name: str) -> bool:
        return module_name in self._modules

    def __contains__(self, module_name: str) -> bool:
        return self.has(module_name)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {sorted(self._modules)})"


MODEL_INITIALIZER = Registry("MODEL_INITIALIZER")
