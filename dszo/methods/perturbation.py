"""The one perturbation mechanism of the functional methods (ZO-Act, LOZO/LOZO-M, AGZO's f+, the 1-D dense terms).

A functional method never writes θ ± εZ into the model: its wrapped layers add the perturbation's effect to
their output during the forward. One `Perturbation` object, shared by all wrappers of a method, says what the
current forward applies -- the direction seed, ε, and the sign: +1 or -1 on the whole batch (two forwards), or
the doubled batch [x; x] with +ε on the first half and -ε on the second, so that one forward gives L+ and L-
(one ZeRO-3 gather of the frozen weights). `measure` and `measure_one_sided` run those forwards.
"""
from __future__ import annotations

from typing import Optional

import torch

from dszo.directions import direction

DOUBLED = None   # sign of a doubled-batch forward: +ε on the first half of the rows, -ε on the second


class Perturbation:
    """What the wrapped layers add in the current forward; inactive outside `measure`."""

    def __init__(self, kind: str = "gaussian") -> None:
        self.kind = kind                      # the directions' distribution (MethodConfig.directions)
        self.active = False
        self.seed = 0
        self.eps = 0.0
        self.sign: Optional[float] = DOUBLED
        self.directions: dict = {}            # tensors a method supplies for this forward (LOZO's U and V)
        self._dense: dict[int, torch.Tensor] = {}

    def set(self, seed: int, eps: float, sign: Optional[float]) -> None:
        if seed != self.seed:
            self._dense.clear()
        self.active, self.seed, self.eps, self.sign = True, seed, eps, sign

    def off(self) -> None:
        self.active = False
        self._dense.clear()
        self.directions.clear()

    def dense(self, key: int, numel: int, device) -> torch.Tensor:
        """The whole dense direction of one tensor (1-D; a forward needs all of it), drawn once."""
        if key not in self._dense:
            self._dense[key] = direction(self.kind, self.seed, key, 0, numel, device=device)
        return self._dense[key]

    def row_signs(self, rows: int) -> list[tuple[slice, float]]:
        """(rows of the batch, sign of ε on them): both halves of a doubled batch, or every row."""
        if self.sign is DOUBLED:
            half = rows // 2
            return [(slice(None, half), +1.0), (slice(half, None), -1.0)]
        return [(slice(None), self.sign)]

    def add(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """y ± ε·delta in place; delta has y's rows or broadcasts over them."""
        e = self.eps * delta
        for rows, sign in self.row_signs(y.shape[0]):
            part = e[rows] if e.dim() == y.dim() else e
            y[rows] += (part if sign > 0 else -part).to(y.dtype)   # sign is ±1: negation is exact
        return y

    def measure(self, runtime, batch, seed: int, eps: float, doubled: bool) -> tuple[float, float, int]:
        """(Σ L(θ+εZ), Σ L(θ-εZ), n) over this rank's `batch`: one forward over [batch; batch], or two."""
        try:
            if doubled:
                self.set(seed, eps, DOUBLED)
                return runtime.loss_sums(batch, doubled=True)
            self.set(seed, eps, +1.0)
            plus, _, n = runtime.loss_sums(batch, doubled=False)
            self.set(seed, eps, -1.0)
            minus, _, _ = runtime.loss_sums(batch, doubled=False)
            return plus, minus, n
        finally:
            self.off()

    def measure_one_sided(self, runtime, batch, seed: int, eps: float) -> tuple[float, int]:
        """(Σ L(θ+εZ), n) over this rank's `batch`."""
        try:
            self.set(seed, eps, +1.0)
            plus, _, n = runtime.loss_sums(batch, doubled=False)
            return plus, n
        finally:
            self.off()
