"""ZO methods, registered by name (config key `method.name`)."""
from dszo.methods.base import REGISTRY, Runtime, Shard, StepStats, ZOMethod, register
from dszo.methods import agzo, lozo, mezo, zo_act  # noqa: F401  (registers)


def get_method(name: str) -> type[ZOMethod]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method.name {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Runtime", "Shard", "StepStats", "ZOMethod", "register", "get_method"]
