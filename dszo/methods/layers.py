"""Choosing and wrapping the linear layers a method adapts (PEFT-style `target_modules`)."""
from __future__ import annotations

import re
from typing import Callable, Optional

from torch import nn

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")   # the first ".<i>." of a name: its block in the model's layer list


def block_index(name: str) -> Optional[int]:
    found = _BLOCK_INDEX.search(name)
    return int(found.group(1)) if found else None


def select_linear_layers(model: nn.Module, targets: list[str],
                         layers: Optional[list[int]] = None) -> list[tuple[str, nn.Linear]]:
    """The linear layers named by `targets` (PEFT's target_modules), in the blocks `layers` (PEFT's
    layers_to_transform; negative indices count from the last block, so [-1] is the last block of any depth)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    chosen = linears if "all-linear" in targets else [
        (n, m) for n, m in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"method.target_modules {targets} matched no linear layer; available: "
                         f"{', '.join(kinds)} (or 'all-linear')")
    return chosen if layers is None else _in_blocks(chosen, layers, linears)


def _in_blocks(chosen: list, layers: list[int], linears: list) -> list:
    depth = 1 + max((i for i in (block_index(n) for n, _ in linears) if i is not None), default=-1)
    bad = [i for i in layers if not -depth <= i < depth]
    if depth == 0 or bad:
        raise ValueError(f"method.layers_to_transform {layers}: the model has {depth} blocks, so indices run from "
                         f"{-depth} to {depth - 1}; {bad or layers} are outside that (or drop the key for all blocks)")
    wanted = {i % depth for i in layers}
    return [(n, m) for n, m in chosen if block_index(n) in wanted]


def wrap_linear_layers(model: nn.Module, targets: list[str], make: Callable[[str, nn.Linear], nn.Module],
                       layers: Optional[list[int]] = None) -> dict[str, nn.Module]:
    """Replace each selected linear layer by make(name, layer) in its parent; returns name -> wrapper."""
    wrapped = {}
    for name, linear in select_linear_layers(model, targets, layers):
        parent, _, child = name.rpartition(".")
        wrapped[name] = make(name, linear)
        setattr(model.get_submodule(parent) if parent else model, child, wrapped[name])
    return wrapped
