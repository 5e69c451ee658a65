"""Choosing and wrapping the linear layers a method adapts (PEFT-style `target_modules`)."""
from __future__ import annotations

from typing import Callable

from torch import nn


def select_linear_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if "all-linear" in targets:
        return linears
    chosen = [(n, m) for n, m in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"method.target_modules {targets} matched no linear layer; available: "
                         f"{', '.join(kinds)} (or 'all-linear')")
    return chosen


def wrap_linear_layers(model: nn.Module, targets: list[str],
                       make: Callable[[str, nn.Linear], nn.Module]) -> dict[str, nn.Module]:
    """Replace each selected linear layer by make(name, layer) in its parent; returns name -> wrapper."""
    wrapped = {}
    for name, linear in select_linear_layers(model, targets):
        parent, _, child = name.rpartition(".")
        wrapped[name] = make(name, linear)
        setattr(model.get_submodule(parent) if parent else model, child, wrapped[name])
    return wrapped
