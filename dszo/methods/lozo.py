"""LOZO and LOZO-M: low-rank directions Z = U Vᵀ per 2-D weight, V redrawn lazily.

For each target linear weight W (m x n): U (m x r) is new every step, V (n x r) is redrawn every
`lazy_interval` steps from an independent stream (the reference code draws both from one re-seeded
stream, so on redraw steps its update differs from the direction it measured). The perturbation is
functional, W x ± ε U (Vᵀ x) on a doubled batch, so nothing is written into W while measuring. The
update W ← W - η g U Vᵀ is written into each rank's partition of W only (the rows of U Vᵀ it owns).

LOZO-M keeps momentum in the small space: N ← β N + (1-β) g U and W ← W - η N Vᵀ; when V is redrawn,
N ← N (V_oldᵀ V_new) / n before the blend. Each rank holds the rows of N its partition of W touches.
The 1-D tensors (norms, biases; `train_1d`) get dense directions, also applied functionally (vectors.py),
with plain SGD for LOZO and the same momentum rule (N ← β N + (1-β) ĝ) for LOZO-M.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import nn

from dszo.directions import direction, mix, tensor_key
from dszo.errors import ConfigError
from dszo.methods.base import Capabilities, MethodConfig, Partition, ZOMethod, ZORuntime, plain_shape, require_sgd
from dszo.methods.estimates import VectorEstimate, apply_low_rank_rows, partition_rows
from dszo.methods.layers import wrap_linear_layers
from dszo.methods.perturbation import Perturbation
from dszo.methods.registry import register
from dszo.methods.vectors import perturb_bias, train_vectors

_V_STREAM = 0x1A2F


def v_seed(run_seed: int, t: int, lazy_interval: int) -> int:
    """The seed of V at step t: its own stream, constant for `lazy_interval` steps."""
    return mix(run_seed, _V_STREAM, t // lazy_interval)


@dataclass
class LOZOConfig(MethodConfig):
    name: str = "lozo"
    zo_eps: float = 1e-3
    rank: int = 2
    lazy_interval: int = 50            # ν: V is redrawn every ν steps
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    momentum: float = 0.0              # β; > 0 keeps momentum in the small space (LOZO-M)
    train_1d: bool = True              # also train norm scales and biases, with dense directions

    base_update: ClassVar[str] = "writes its low-rank update U Vᵀ into the base weights"

    def capabilities(self) -> Capabilities:
        return Capabilities(writes_base_weights=True)

    def validate(self) -> None:
        super().validate()
        if self.rank < 1 or self.lazy_interval < 1:
            raise ConfigError("method.rank and method.lazy_interval must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"method.momentum must lie in [0, 1), got {self.momentum}")


@dataclass
class LOZOMConfig(LOZOConfig):
    name: str = "lozo_m"
    momentum: float = 0.9


class LowRankPerturbedLinear(nn.Module):
    """W x ± ε U (Vᵀ x) (and the bias' dense term) while the method measures; U, V from the perturbation."""

    def __init__(self, base: nn.Linear, name: str, perturbation: Perturbation) -> None:
        super().__init__()
        self.base, self.name = base, name
        self.key, self.key_bias = tensor_key(f"{name}.base.weight"), tensor_key(f"{name}.base.bias")
        object.__setattr__(self, "_perturbation", perturbation)  # shared state, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._perturbation
        y = perturb_bias(p, self.base(x), self.key_bias, self.base)
        if not p.active:
            return y
        u, v = (d.to(x.device) for d in p.directions[self.key])
        return p.add(y, (x.to(v.dtype) @ v) @ u.T)          # ε U (Vᵀ x) without forming U Vᵀ


class LOZO(ZOMethod):
    name = "lozo"

    def __init__(self, cfg, run_seed: int) -> None:
        super().__init__(cfg, run_seed)
        require_sgd(cfg, "U Vᵀ (LOZO-M: with its own momentum, method.momentum)")

    def attach(self, model: nn.Module, shape_of=plain_shape) -> None:
        self.perturbation = Perturbation(self.cfg.method.directions)
        wrapped = wrap_linear_layers(model, self.cfg.method.target_modules,
                                     lambda name, linear: LowRankPerturbedLinear(linear, name, self.perturbation))
        self.layers: dict[str, LowRankPerturbedLinear] = {f"{n}.base.weight": w for n, w in wrapped.items()}
        self.vectors, self.frozen_1d = train_vectors(model, self.cfg.method.train_1d, wrapped, self.perturbation,
                                                     shape_of)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {**{n: layer.base.weight for n, layer in self.layers.items()}, **self.vectors}

    def prepare(self, runtime: ZORuntime, calibration_batches: list | None) -> None:
        self.matrices = {n: self.partitions[n] for n in self.layers}
        self.dims = {n: (p.shape[0], p.shape[1]) for n, p in self.matrices.items()}
        self.rows = {n: partition_rows(p) for n, p in self.matrices.items()}  # rows of W (and U, N) this rank touches
        self.u_sum: dict[str, torch.Tensor] = {}
        self.momentum_buf: dict[str, Optional[torch.Tensor]] = {n: None for n in self.matrices}
        self.vector_estimate = VectorEstimate({n: self.partitions[n] for n in self.vectors}, self.cfg.method.momentum,
                                              self.cfg.method.directions)

    # -- directions -----------------------------------------------------------------------------------
    def _v(self, t: int, name: str) -> torch.Tensor:
        m, n = self.dims[name]
        r = self.cfg.method.rank
        seed = v_seed(self.run_seed, t, self.cfg.method.lazy_interval)
        part = self.partitions[name]
        return direction(self.cfg.method.directions, seed, part.key, 0, n * r, device=part.local.device).view(n, r)

    def _u_rows(self, dseed: int, name: str, r0: int, r1: int) -> torch.Tensor:
        r = self.cfg.method.rank
        part = self.partitions[name]
        return direction(self.cfg.method.directions, dseed, part.key, r0 * r, r1 * r,
                         device=part.local.device).view(r1 - r0, r)

    # -- the step -------------------------------------------------------------------------------------
    def losses(self, t: int, dseed: int, batch, runtime: ZORuntime) -> tuple[float, float, int]:
        m = self.cfg.method
        for name, layer in self.layers.items():
            self.perturbation.directions[layer.key] = (self._u_rows(dseed, name, 0, self.dims[name][0]),
                                                       self._v(t, name))
        return self.perturbation.measure(runtime, batch, dseed, m.zo_eps, doubled=m.functional_perturbation)

    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        self.vector_estimate.accumulate(dseed, coeff)
        for name in self.matrices:
            r0, r1 = self.rows[name]
            u = self._u_rows(dseed, name, r0, r1)
            self.u_sum[name] = u.mul_(coeff) if name not in self.u_sum else self.u_sum[name].add_(u, alpha=coeff)

    def update(self, t: int, lr: float) -> None:
        beta = self.cfg.method.momentum
        redraw = t > 0 and t % self.cfg.method.lazy_interval == 0
        self.vector_estimate.apply(lr)
        for name, part in self.matrices.items():
            if part.local.numel() == 0:
                continue
            v = self._v(t, name)
            step_dir = self.u_sum.pop(name)                 # Σ_d g_d U_d (rows of this rank): the LOZO update
            if beta > 0:
                buf = self.momentum_buf[name]
                if buf is not None and redraw:              # carry momentum into the new V's coordinates
                    buf = buf @ (self._v(t - 1, name).T @ v) / self.dims[name][1]
                buf = step_dir.mul_(1 - beta) if buf is None else buf.mul_(beta).add_(step_dir, alpha=1 - beta)
                self.momentum_buf[name] = buf
                step_dir = buf
            apply_low_rank_rows(part, step_dir, v, lr)

    def discard(self) -> None:
        self.vector_estimate.discard()
        self.u_sum.clear()

    # -- checkpoints: LOZO-M's momentum, rows [r0, r1) of N (m x r) per matrix, and of the 1-D tensors ------
    def optimizer_state_dict(self) -> dict:
        r, out = self.cfg.method.rank, self.vector_estimate.state_dict()
        for name, buf in self.momentum_buf.items():
            if buf is not None:
                (r0, r1), m = self.rows[name], self.dims[name][0]
                out[f"{name}::momentum_N"] = Partition(f"{name}::momentum_N", 0, (m, r), r0 * r, r1 * r,
                                                       buf.reshape(-1))
        return out

    def load_optimizer_state_dict(self, saved) -> None:
        self.vector_estimate.load_state_dict(saved)
        r = self.cfg.method.rank
        for name in self.momentum_buf:
            key = f"{name}::momentum_N"
            if key in saved.names() and self.matrices[name].local.numel():
                r0, r1 = self.rows[name]
                self.momentum_buf[name] = saved.read(key, r0 * r, r1 * r).view(r1 - r0, r)


class LOZOM(LOZO):
    name = "lozo_m"


register(LOZOConfig, LOZO)
register(LOZOMConfig, LOZOM)
