import pytest

from pytrain.registry import MODEL_INITIALIZER, Registry


def test_register_get_has():
    registry = Registry("TEST")

    @registry.register_module(module_name="A")
    def build_a(**kwargs):
        return ("a", kwargs)

    assert registry.has("A") and "A" in registry and not registry.has("B")
    assert registry.get_module("A")(x=1) == ("a", {"x": 1})


def test_register_default_name_and_direct_call():
    registry = Registry("TEST")

    @registry.register_module()
    def builder():
        return 1

    registry.register_module("other", module=len)
    assert registry.get_module("builder") is builder
    assert registry.get_module("other") is len


def test_registering_twice_is_an_error():
    registry = Registry("TEST")
    registry.register_module("A", module=len)
    with pytest.raises(KeyError, match="'A' is already registered"):
        registry.register_module("A", module=max)
    assert registry.get_module("A") is len


def test_unknown_name_lists_registered():
    registry = Registry("TEST")
    registry.register_module("ONE", module=len)
    registry.register_module("TWO", module=max)
    with pytest.raises(KeyError, match="no module registered as 'THREE'; registered: ONE, TWO"):
        registry.get_module("THREE")


def test_internlm_is_registered():
    import pytrain.model  # noqa: F401

    assert MODEL_INITIALIZER.has("INTERNLM")


def test_builtins_are_imported_at_the_first_lookup(tmp_path, monkeypatch):
    """A registry's built-in module registers its entries when first looked up, once; an import error repeats."""
    (tmp_path / "fake_builtins.py").write_text(
        "from pytrain.registry import MODEL_INITIALIZER as _\nimport builtins_target\nbuiltins_target.REGISTRY.register_module('BUILTIN', module=len)\n"
    )
    (tmp_path / "builtins_target.py").write_text("REGISTRY = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins_target

    registry = Registry("TEST", builtins="fake_builtins")
    builtins_target.REGISTRY = registry
    registry.register_module("OWN", module=max)  # registering does not import the built-ins
    assert registry._modules.keys() == {"OWN"}
    assert registry.names() == ["BUILTIN", "OWN"] and "BUILTIN" in registry and registry.get_module("BUILTIN") is len

    broken = Registry("TEST", builtins="no_such_module_here")
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
            broken.has("X")


def test_unregister():
    registry = Registry("TEST")
    registry.register_module("A", module=len)
    assert registry.unregister("A") is len and not registry.has("A")
    with pytest.raises(KeyError, match="no module registered as 'A'"):
        registry.unregister("A")


def test_model_families_are_registered_without_importing_pytrain_model_first():
    import subprocess
    import sys

    code = "from pytrain.registry import MODEL_INITIALIZER as M; print(M.has('INTERNLM'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
