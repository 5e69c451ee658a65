"""Training methods: one module each, registered by name (config key `method.name`) in dszo/methods/registry.py."""
from dszo.methods.base import Capabilities, Method, MethodConfig, Partition, ZOMethod
from dszo.methods.registry import lookup, names, register


def get_method(name: str) -> type[Method]:
    """The method class registered as `name`."""
    return lookup(name).method


__all__ = ["Capabilities", "Method", "MethodConfig", "Partition", "ZOMethod", "get_method", "lookup", "names",
           "register"]
