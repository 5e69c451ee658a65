"""Gradient estimates accumulated over a step's directions on this rank's partitions, and their updates.

- DenseEstimate: ĝ = Σ_d coeff_d Z_d with dense Gaussian Z, applied by a partition optimiser (ZO-Act's B, MeZO).
- VectorEstimate: the same on 1-D tensors with plain SGD, or LOZO-M's momentum rule (LOZO, AGZO).
- Low-rank rows: a rank forms only the rows of U Vᵀ its partition of a 2-D weight holds (LOZO, AGZO).
"""
from __future__ import annotations

import torch

from dszo.directions import direction
from dszo.methods.base import Partition
from dszo.optim import PartitionOptimizer


def dense_direction(dseed: int, part: Partition, lo: int = 0, hi: int | None = None, kind: str = "gaussian",
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements [lo, hi) of this rank's partition (default: all of it) of the dense Gaussian direction `dseed`."""
    hi = part.local.numel() if hi is None else hi
    return direction(kind, dseed, part.key, part.start + lo, part.start + hi, dtype=part.local.dtype,
                     device=part.local.device, out=out)


class Scratch:
    """Buffers reused across slices and steps: a temporary above glibc's mmap threshold (1 MiB, pinned by dszo)
    is mapped, page-faulted and zeroed afresh each time it is allocated, which cost MeZO's CPU step as much
    system time as compute."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n]


class DenseEstimate:
    """ĝ = Σ_d coeff_d Z_d on this rank's partitions (dense Gaussian Z), applied by a partition optimiser. Fused:
    the step keeps only its (seed, coeff) pairs; `apply` regenerates each Z one slice at a time and updates that
    slice, so no buffer of the partition's size is held (the bits equal those of a whole-partition estimate:
    every operation is elementwise and a direction's slice is the slice of the whole)."""

    SLICE = 1 << 20   # elements regenerated and updated at a time

    def __init__(self, partitions: dict[str, Partition], cfg, no_decay: frozenset = frozenset()) -> None:
        self.partitions, self.kind = partitions, cfg.method.directions
        self.optimizer = PartitionOptimizer(cfg.optim, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon,
                                            cfg.momentum, cfg.weight_decay, no_decay=no_decay)
        self.pending: list[tuple[int, float]] = []   # this step's directions and their coefficients
        self.scratch = Scratch()

    def accumulate(self, dseed: int, coeff: float) -> None:
        self.pending.append((dseed, coeff))

    def apply(self, lr: float) -> None:
        self.optimizer.begin_step()
        for name, part in self.partitions.items():
            n = part.local.numel()
            for lo in range(0, n, self.SLICE):
                hi = min(n, lo + self.SLICE)
                grad = self.scratch.get("grad", hi - lo, part.local).zero_()
                z = self.scratch.get("z", hi - lo, part.local)
                for dseed, coeff in self.pending:   # only the slice of Z this rank owns, a piece at a time
                    grad.add_(dense_direction(dseed, part, lo, hi, self.kind, out=z), alpha=coeff)
                self.optimizer.update(name, part.local[lo:hi], grad, lr, slice(lo, hi), n)
        self.discard()

    def discard(self) -> None:
        self.pending.clear()

    def state_dict(self) -> dict:
        """The optimiser's moments as Partitions `<tensor>::<moment>`, and its step count."""
        out: dict = {f"{n}::{k}": Partition(f"{n}::{k}", p.key, p.shape, p.start, p.end, t)
                     for n, p in self.partitions.items() for k, t in self.optimizer.state.get(n, {}).items()}
        return {**out, "optimizer_steps": self.optimizer.steps}

    def load_state_dict(self, saved) -> None:
        self.optimizer.steps = int(saved.scalars["optimizer_steps"])
        names = saved.names()
        for n, p in self.partitions.items():
            for key in sorted(k for k in names if k.startswith(n + "::")):
                self.optimizer.state.setdefault(n, {})[key[len(n) + 2:]] = saved.read(key, p.start, p.end).to(p.local)


class DenseEstimateState:
    """For methods whose update is a DenseEstimate in `self.estimate` (ZO-Act, MeZO): dropping a skipped step's
    estimate and the checkpoint state (the optimiser's moments) are the estimate's."""

    def discard(self) -> None:
        self.estimate.discard()

    def optimizer_state_dict(self) -> dict:
        return self.estimate.state_dict()

    def load_optimizer_state_dict(self, saved) -> None:
        self.estimate.load_state_dict(saved)


class VectorEstimate:
    """ĝ = Σ_d g_d z_d on this rank's partitions of the 1-D tensors, and its SGD update -- with LOZO-M's
    momentum (N ← β N + (1-β) ĝ; θ ← θ - η N) when beta > 0, the same rule as in the small space."""

    def __init__(self, partitions: dict[str, Partition], beta: float = 0.0, kind: str = "gaussian") -> None:
        self.partitions, self.beta, self.kind = partitions, beta, kind
        self.estimate = {n: torch.zeros_like(p.local) for n, p in partitions.items()}
        self.buf: dict[str, torch.Tensor] = {}

    def accumulate(self, dseed: int, coeff: float) -> None:
        for name, part in self.partitions.items():
            self.estimate[name].add_(dense_direction(dseed, part, kind=self.kind), alpha=coeff)

    def apply(self, lr: float) -> None:
        for name, part in self.partitions.items():
            step = self.estimate[name]
            if self.beta > 0:
                buf = self.buf.get(name)
                step = self.buf[name] = (step.clone().mul_(1 - self.beta) if buf is None
                                         else buf.mul_(self.beta).add_(step, alpha=1 - self.beta))
            part.local.add_(step, alpha=-lr)
        self.discard()

    def discard(self) -> None:
        for e in self.estimate.values():
            e.zero_()

    def state_dict(self) -> dict[str, Partition]:
        return {f"{n}::momentum": Partition(f"{n}::momentum", p.key, p.shape, p.start, p.end, self.buf[n])
                for n, p in self.partitions.items() if n in self.buf}

    def load_state_dict(self, saved) -> None:
        for n, p in self.partitions.items():
            if f"{n}::momentum" in saved.names():
                self.buf[n] = saved.read(f"{n}::momentum", p.start, p.end).to(p.local)


def partition_rows(part: Partition) -> tuple[int, int]:
    """Rows [r0, r1) of a 2-D weight that the flat partition [start, end) touches."""
    n = part.shape[1]
    return part.start // n, max(part.start, part.end - 1) // n + 1


UPDATE_SLICE = 1 << 20  # elements of U Vᵀ formed at a time: 4 MB in fp32, whatever the layer's size


def apply_low_rank_rows(part: Partition, u_rows: torch.Tensor, v: torch.Tensor, lr: float) -> None:
    """W[start:end] (flat) -= lr * (U Vᵀ)[the same elements], given the rows partition_rows(part) of U: each rank
    forms only the rows of U Vᵀ its partition holds, a slice of rows at a time (never the whole block)."""
    if part.local.numel() == 0:
        return
    n = part.shape[1]
    first = part.start // n
    step = max(1, UPDATE_SLICE // n)
    for r in range(first, first + u_rows.shape[0], step):
        lo, hi = max(part.start, r * n), min(part.end, (r + step) * n)  # flat range of these rows we hold
        if lo >= hi:
            continue
        block = (u_rows[r - first:r - first + step] @ v.T).reshape(-1)
        part.local[lo - part.start:hi - part.start].add_(block[lo - r * n:hi - r * n].to(part.local.dtype),
                                                         alpha=-lr)
