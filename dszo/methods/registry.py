"""The one registry of training methods: `method.name` -> (config class, method class).

A method is one module under dszo/methods/ that ends with `register(ItsConfig, ItsMethod)`; modules here are
discovered, not listed, so adding a method touches no other file. A second registration of a name is an error.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import NamedTuple

from dszo.errors import ConfigError

# Modules of this package that hold shared machinery, not a method.
INFRASTRUCTURE = {"base", "estimates", "layers", "perturbation", "registry", "vectors"}


class Entry(NamedTuple):
    config: type
    method: type


_REGISTRY: dict[str, Entry] = {}
_discovered = False


def register(config_cls: type, method_cls: type) -> None:
    """Register a method under its config's default `name` (the class attribute `name` of both must agree)."""
    name = config_cls.name
    if getattr(method_cls, "name", name) != name:
        raise TypeError(f"{method_cls.__name__}.name = {method_cls.name!r} but its config says {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].method.__module__} and "
                         f"{method_cls.__module__}); choose another name")
    _REGISTRY[name] = Entry(config_cls, method_cls)


def _discover() -> None:
    global _discovered
    if not _discovered:
        package = importlib.import_module("dszo.methods")
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in INFRASTRUCTURE and not info.name.startswith("_"):
                importlib.import_module(f"dszo.methods.{info.name}")   # a broken module raises here, every time
        _discovered = True


def names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def lookup(name: str) -> Entry:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"config key 'method.name': unknown method {name!r}; available: {', '.join(names())}")
    return _REGISTRY[name]
