"""Training methods, registered by name (config key `method.name`)."""
from dszo.methods.base import REGISTRY, Method, Runtime, Shard, StepStats, ZOMethod, register
from dszo.methods import agzo, first_order, lozo, mezo, zo_act  # noqa: F401  (registers)


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method.name {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "Runtime", "Shard", "StepStats", "ZOMethod", "register", "get_method"]
