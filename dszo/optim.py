"""Optimisers and learning-rate schedules on a rank's partitions of the trainable tensors.

Each rank keeps optimiser state only for the elements it owns. The update rules are those of
torch.optim.Adam / SGD(momentum) applied to the ZO gradient estimate g*Z of the owned slice.
Weight decay is decoupled (AdamW style) for Adam and added to the gradient for SGD/momentum.
"""
from __future__ import annotations

import math

import torch


def lr_at(step: int, base_lr: float, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for 0-based `step` (HF semantics: linear warm-up, then constant/linear/cosine decay)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {schedule!r}")


class PartitionOptimizer:
    """Adam / SGD with momentum / SGD on this rank's partitions. Updates are elementwise, so a partition may be
    updated in slices (`begin_step`, then `update` per slice): the fused ZO updates regenerate the direction one
    slice at a time instead of holding a gradient estimate of the partition's size."""

    def __init__(self, kind: str, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9,
                 weight_decay: float = 0.0, no_decay: frozenset = frozenset()) -> None:
        if kind not in ("adam", "momentum", "sgd"):
            raise ValueError(f"unknown optimiser {kind!r} (adam, momentum, sgd)")
        self.kind, self.betas, self.eps, self.momentum, self.weight_decay = kind, betas, eps, momentum, weight_decay
        self.no_decay = no_decay  # names exempt from weight decay (biases, norms)
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0
        self._fresh: set[str] = set()   # names whose state was created this step (momentum: the first buffer)

    def step(self, updates: dict[str, tuple[torch.Tensor, torch.Tensor]], lr: float) -> None:
        """`updates`: name -> (owned parameter slice, in place; its gradient estimate)."""
        self.begin_step()
        for name, (param, grad) in updates.items():
            self.update(name, param, grad, lr, slice(0, param.numel()), param.numel())

    def begin_step(self) -> None:
        self.steps += 1
        self._fresh.clear()

    def update(self, name: str, param: torch.Tensor, grad: torch.Tensor, lr: float, part: slice, numel: int) -> None:
        """Elements `part` of tensor `name` (numel elements on this rank): `param` and `grad` are those elements."""
        if param.numel() == 0:
            return
        st = self._state(name, numel, param)
        wd = 0.0 if name in self.no_decay else self.weight_decay
        if self.kind == "adam":
            self._adam(param, grad, {k: v[part] for k, v in st.items()}, lr, wd)
            return
        if wd:
            grad = grad + wd * param
        if self.kind == "momentum":
            buf = st["momentum_buffer"][part]
            if name in self._fresh:    # torch.optim.SGD: the first step stores the gradient itself as the buffer
                buf.copy_(grad)
            else:
                buf.mul_(self.momentum).add_(grad)
            grad = buf
        param.add_(grad, alpha=-lr)

    def _state(self, name: str, numel: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state.setdefault(name, {})
        keys = {"adam": ("exp_avg", "exp_avg_sq"), "momentum": ("momentum_buffer",), "sgd": ()}[self.kind]
        if any(k not in st for k in keys):
            st.update({k: torch.zeros(numel, dtype=like.dtype, device=like.device) for k in keys})
            self._fresh.add(name)
        return st

    def _adam(self, param, grad, st, lr, wd) -> None:
        b1, b2 = self.betas
        if wd:
            param.mul_(1 - lr * wd)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
        param.addcdiv_(m, denom, value=-lr / bc1)
