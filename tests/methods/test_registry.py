"""The one registry: every method module is discovered, a name is registered once, and what code outside a method
needs to know comes from its declared capabilities."""
from dataclasses import dataclass

import pytest

from dszo.config import ConfigError, load_config
from dszo.methods import registry
from dszo.methods.base import MethodConfig


def test_every_method_module_is_discovered():
    assert registry.names() == ["agzo", "first_order", "lozo", "lozo_m", "mezo", "zo_act"]
    entry = registry.lookup("lozo_m")
    assert entry.method.name == entry.config.name == "lozo_m"


def test_a_second_registration_of_a_name_is_an_error():
    @dataclass
    class Again(MethodConfig):
        name: str = "zo_act"

    class AgainMethod:
        name = "zo_act"

    with pytest.raises(ValueError, match="registered twice"):
        registry.register(Again, AgainMethod)
    assert registry.lookup("zo_act").config.__name__ == "ZOActConfig"


def test_config_and_method_must_agree_on_the_name():
    @dataclass
    class Named(MethodConfig):
        name: str = "named_in_test"

    class Other:
        name = "other"

    with pytest.raises(TypeError, match="config says 'named_in_test'"):
        registry.register(Named, Other)
    assert "named_in_test" not in registry.names()


def test_unknown_method_names_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'zoact'; available: agzo, first_order, lozo"):
        registry.lookup("zoact")


@pytest.mark.parametrize("name, replayable, resumable, writes_base, adapter", [
    ("zo_act", True, True, False, True), ("mezo", True, True, True, False), ("lozo", True, True, True, False),
    ("agzo", False, True, True, False), ("first_order", False, False, False, True)])
def test_capabilities(name, replayable, resumable, writes_base, adapter):
    caps = load_config(None, {"method": {"name": name}, "optim": "sgd"}).method.capabilities()
    assert (caps.replayable, caps.resumable, caps.writes_base_weights, caps.exports_adapter) == (
        replayable, resumable, writes_base, adapter)
    assert caps.result_file == ("adapter.safetensors" if adapter else "trainable.safetensors")
