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
