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
from typing import Optional

import torch
from torch import nn

from dszo.config import ConfigError, MethodConfig, register_method_config
from dszo.directions import gaussian, mix, tensor_key
from dszo.methods.base import Runtime, Shard, ZOMethod, register, require_sgd
from dszo.methods.layers import wrap_linear_layers
from dszo.methods.vectors import VectorEstimate, VectorPerturbation, perturb_bias, unsupported_vectors, wrap_norms
from dszo.quantization import refuse

_V_STREAM = 0x1A2F


def v_seed(run_seed: int, t: int, lazy_interval: int) -> int:
    """The seed of V at step t: its own stream, constant for `lazy_interval` steps."""
    return mix(run_seed, _V_STREAM, t // lazy_interval)


@register_method_config("lozo")
@dataclass
class LOZOConfig(MethodConfig):
    name: str = "lozo"
    zo_eps: float = 1e-3
    rank: int = 2
    lazy_interval: int = 50            # ν: V is redrawn every ν steps
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    momentum: float = 0.0              # β; > 0 keeps momentum in the small space (LOZO-M)
    train_1d: bool = True              # also train norm scales and biases, with dense directions

    def check_model(self, model) -> None:
        refuse(self.name, model.quantization, "writes its low-rank update U Vᵀ into the base weights")

    def validate(self) -> None:
        super().validate()
        if self.rank < 1 or self.lazy_interval < 1:
            raise ConfigError("method.rank and method.lazy_interval must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"method.momentum must lie in [0, 1), got {self.momentum}")


@register_method_config("lozo_m")
@dataclass
class LOZOMConfig(LOZOConfig):
    name: str = "lozo_m"
    momentum: float = 0.9


def shard_rows(s: Shard) -> tuple[int, int]:
    """Rows [r0, r1) of a 2-D weight that the flat partition [start, end) touches."""
    n = s.shape[1]
    return s.start // n, max(s.start, s.end - 1) // n + 1


def apply_low_rank_rows(s: Shard, u_rows: torch.Tensor, v: torch.Tensor, lr: float) -> None:
    """W[start:end] (flat) -= lr * (U Vᵀ)[the same elements], given the rows shard_rows(s) of U: each rank
    forms only the rows of U Vᵀ its partition holds."""
    if s.local.numel() == 0:
        return
    n = s.shape[1]
    r0 = s.start // n
    block = (u_rows @ v.T).reshape(-1)
    s.local.add_(block[s.start - r0 * n: s.end - r0 * n].to(s.local.dtype), alpha=-lr)


class LowRankPerturbation:
    """Shared by the wrapped layers: which U, V (if any) the current forward applies."""

    def __init__(self) -> None:
        self.active = False
        self.eps, self.sign = 0.0, None
        self.u: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}


class LowRankPerturbedLinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, ctx: LowRankPerturbation, vctx: VectorPerturbation) -> None:
        super().__init__()
        self.base, self.name = base, name
        self.key = tensor_key(f"{name}.base.weight")
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_vctx", vctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = perturb_bias(self._vctx, self.base(x), self.name, self.base)
        ctx = self._ctx
        if not ctx.active:
            return y
        u, v = ctx.u[self.key].to(x.device), ctx.v[self.key].to(x.device)
        h = (x.to(v.dtype) @ v) @ u.T                       # ε U (Vᵀ x) without forming U Vᵀ
        if ctx.sign is None:                                # doubled batch: +ε on the first half, -ε on the second
            half = x.shape[0] // 2
            y[:half] += (ctx.eps * h[:half]).to(y.dtype)
            y[half:] -= (ctx.eps * h[half:]).to(y.dtype)
            return y
        return y.add_((ctx.sign * ctx.eps * h).to(y.dtype))


def train_vectors(model: nn.Module, enabled: bool, linears: dict,
                  vctx: VectorPerturbation) -> tuple[dict[str, nn.Parameter], list[str]]:
    """The 1-D tensors trained with dense directions -- every supported norm's scale/shift and the biases of
    the wrapped linear layers -- and the 1-D tensors left frozen for want of a functional perturbation
    (none of either when `enabled` is false)."""
    if not enabled:
        return {}, []
    vectors = wrap_norms(model, vctx)
    vectors.update({f"{n}.base.bias": w.base.bias for n, w in linears.items() if w.base.bias is not None})
    return vectors, unsupported_vectors(model, vectors)


@register
class LOZO(ZOMethod):
    name = "lozo"

    def __init__(self, cfg, run_seed: int) -> None:
        super().__init__(cfg, run_seed)
        require_sgd(cfg, "U Vᵀ (LOZO-M: with its own momentum, method.momentum)")

    def attach(self, model: nn.Module) -> None:
        self.ctx, self.vctx = LowRankPerturbation(), VectorPerturbation()
        wrapped = wrap_linear_layers(model, self.cfg.method.target_modules, lambda name, linear: LowRankPerturbedLinear(
            linear, name, self.ctx, self.vctx))
        self.layers: dict[str, LowRankPerturbedLinear] = {f"{n}.base.weight": w for n, w in wrapped.items()}
        self.vectors, self.frozen_1d = train_vectors(model, self.cfg.method.train_1d, wrapped, self.vctx)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {**{n: layer.base.weight for n, layer in self.layers.items()}, **self.vectors}

    def setup(self, rt: Runtime, calibration_batches: list) -> None:
        self.shards = {n: rt.shard(n, p) for n, p in self.trainable().items()}
        self.matrices = {n: self.shards[n] for n in self.layers}
        self.dims = {n: (s.shape[0], s.shape[1]) for n, s in self.matrices.items()}
        self.rows = {n: shard_rows(s) for n, s in self.matrices.items()}  # rows of W (and U, N) this rank touches
        self.u_sum: dict[str, torch.Tensor] = {}
        self.momentum_buf: dict[str, Optional[torch.Tensor]] = {n: None for n in self.matrices}
        self.vector_estimate = VectorEstimate({n: self.shards[n] for n in self.vectors}, self.cfg.method.momentum)

    # -- directions -----------------------------------------------------------------------------------
    def _v(self, t: int, name: str) -> torch.Tensor:
        m, n = self.dims[name]
        r = self.cfg.method.rank
        seed = v_seed(self.run_seed, t, self.cfg.method.lazy_interval)
        return gaussian(seed, self.shards[name].key, 0, n * r).view(n, r)

    def _u_rows(self, dseed: int, name: str, r0: int, r1: int) -> torch.Tensor:
        r = self.cfg.method.rank
        return gaussian(dseed, self.shards[name].key, r0 * r, r1 * r).view(r1 - r0, r)

    # -- the step -------------------------------------------------------------------------------------
    def losses(self, t: int, dseed: int, batch, rt: Runtime) -> tuple[float, float, int]:
        m = self.cfg.method
        for name, layer in self.layers.items():
            self.ctx.u[layer.key] = self._u_rows(dseed, name, 0, self.dims[name][0])
            self.ctx.v[layer.key] = self._v(t, name)
        self.ctx.active, self.ctx.eps = True, m.zo_eps
        try:
            if m.functional_perturbation:
                self.ctx.sign = None
                self.vctx.set(dseed, m.zo_eps, None)
                return rt.loss_sums(batch, doubled=True)
            self.ctx.sign = +1.0
            self.vctx.set(dseed, m.zo_eps, +1.0)
            lp, _, n = rt.loss_sums(batch, doubled=False)
            self.ctx.sign = -1.0
            self.vctx.set(dseed, m.zo_eps, -1.0)
            lm, _, _ = rt.loss_sums(batch, doubled=False)
            return lp, lm, n
        finally:
            self.ctx.active = False
            self.ctx.u.clear()
            self.ctx.v.clear()
            self.vctx.off()

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
        for name, s in self.matrices.items():
            if s.local.numel() == 0:
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
            apply_low_rank_rows(s, step_dir, v, lr)

    def discard(self) -> None:
        self.vector_estimate.discard()
        self.u_sum.clear()

    # -- checkpoints: LOZO-M's momentum, rows [r0, r1) of N (m x r) per matrix, and of the 1-D tensors ------
    def state_shards(self) -> dict[str, Shard]:
        r, out = self.cfg.method.rank, self.vector_estimate.state_shards()
        for name, buf in self.momentum_buf.items():
            if buf is not None:
                (r0, r1), m = self.rows[name], self.dims[name][0]
                out[f"{name}::momentum_N"] = Shard(f"{name}::momentum_N", 0, (m, r), r0 * r, r1 * r, buf.reshape(-1))
        return out

    def load_state(self, reader, scalars: dict) -> None:
        self.vector_estimate.load_state(reader)
        r = self.cfg.method.rank
        for name in self.momentum_buf:
            key = f"{name}::momentum_N"
            if key in reader.names() and self.matrices[name].local.numel():
                r0, r1 = self.rows[name]
                self.momentum_buf[name] = reader.read(key, r0 * r, r1 * r).view(r1 - r0, r)


@register
class LOZOM(LOZO):
    name = "lozo_m"
