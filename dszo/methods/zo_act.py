"""ZO-Act: zeroth-order training of coefficients on fixed activation bases.

Every adapted linear layer computes  y = W x + B (Vᵀ x)  where W is frozen (it may be quantized and is
never written), V (n x r) spans the dominant subspace of the layer's input activations -- computed once
from calibration data -- and B (m x r, initialised to 0) is trained with two-sided SPSA along dense
Gaussian directions Z on B. The gradient of a linear layer, Σ δ hᵀ, lies in the span of its inputs h, so
perturbing B along V's span wastes little of the direction on coordinates the loss cannot feel.

The perturbation is functional: on a doubled batch [x; x] the layer adds +εZ(Vᵀx) to the first copy and
-εZ(Vᵀx) to the second, so one forward gives L+ and L- and nothing is written into the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

from dszo.config import ConfigError, MethodConfig, register_method_config
from dszo.directions import gaussian, mix, tensor_key
from dszo.methods.base import DenseEstimate, DenseEstimateState, Runtime, ZOMethod, register
from dszo.methods.layers import wrap_linear_layers
from dszo.subspace import nystrom_basis, orthonormalize, sketch_width

_BASIS_STREAM = 0xBA515


@register_method_config("zo_act")
@dataclass
class ZOActConfig(MethodConfig):
    name: str = "zo_act"
    # Rank r of each layer's activation basis, and which linear layers get coefficients
    # (module-name suffixes as in PEFT; "all-linear" = every nn.Linear except the LM head).
    rank: int = 1
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    num_calibration: int = 64          # training examples (over all ranks) the bases are computed from
    calibration_batch_size: int = 16
    basis_power_iters: int = 1         # the calibration data is read basis_power_iters + 1 times
    basis_oversample: int = 8          # sketch width k = rank + basis_oversample (exact when k >= n)
    # orthonormal: the top-r eigenvectors as they are (the method as published). unit_rms: each scaled so that
    # Vᵀh has unit mean square over the calibration tokens, which makes zo_eps and the learning rate mean the
    # same in every layer (input norms differ by >100x across a Llama's layers); see README.
    basis_scale: Literal["orthonormal", "unit_rms"] = "orthonormal"

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ConfigError(f"method.rank must be >= 1, got {self.rank}")
        if self.num_calibration < 1 or self.calibration_batch_size < 1:
            raise ConfigError("method.num_calibration and method.calibration_batch_size must be >= 1")
        if self.basis_power_iters < 0 or self.basis_oversample < 0:
            raise ConfigError("method.basis_power_iters and method.basis_oversample must be >= 0")


class LayerPerturbation:
    """What the adapted layers do in the current forward; one object shared by all of them."""

    def __init__(self) -> None:
        self.mode = "off"                     # off | perturb | calibrate
        self.seed = 0
        self.eps = 0.0
        self.sign: Optional[float] = None     # None: doubled batch (first half +eps, second half -eps)
        self.token_mask: Optional[torch.Tensor] = None
        self._z: dict[int, torch.Tensor] = {}

    def perturb(self, seed: int, eps: float, sign: Optional[float]) -> None:
        if seed != self.seed:
            self._z.clear()
        self.mode, self.seed, self.eps, self.sign = "perturb", seed, eps, sign

    def off(self) -> None:
        self.mode = "off"
        self._z.clear()

    def z(self, key: int, shape: torch.Size, device) -> torch.Tensor:
        """The whole direction of one coefficient matrix (the forward needs all of it; it is m x r)."""
        if key not in self._z:
            self._z[key] = gaussian(self.seed, key, 0, shape.numel(), device=device).view(shape)
        return self._z[key]


class ZOActLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, ctx: LayerPerturbation, key_B: int) -> None:
        super().__init__()
        self.base = base
        self.zo_V = nn.Parameter(torch.zeros(base.in_features, rank), requires_grad=False)
        self.zo_B = nn.Parameter(torch.zeros(base.out_features, rank), requires_grad=False)
        object.__setattr__(self, "_ctx", ctx)  # shared state, not a submodule
        self.key_B = key_B  # directions.tensor_key of this layer's B
        self.sketch_q: Optional[torch.Tensor] = None   # calibration iterate (n x k), not sharded
        self.sketch_s: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self._ctx
        if ctx.mode == "calibrate":
            h = x.reshape(-1, x.shape[-1])[ctx.token_mask].to(self.sketch_q.dtype)
            self.sketch_s += h.T @ (h @ self.sketch_q)
            return y
        h = x.to(self.zo_V.dtype) @ self.zo_V                 # [..., r]: the only projection of x formed
        b = self.zo_B
        if ctx.mode == "perturb":
            z = ctx.z(self.key_B, b.shape, h.device)
            if ctx.sign is None:                              # doubled batch: (B+εZ) on the first half, (B-εZ) on the second
                half = x.shape[0] // 2
                y[:half] += (h[:half] @ (b + ctx.eps * z).T).to(y.dtype)
                y[half:] += (h[half:] @ (b - ctx.eps * z).T).to(y.dtype)
                return y
            b = b + (ctx.sign * ctx.eps) * z
        return y.add_((h @ b.T).to(y.dtype))                  # in place: no second output-sized buffer


@register
class ZOAct(DenseEstimateState, ZOMethod):
    name = "zo_act"
    result_file = "adapter.safetensors"

    def attach(self, model: nn.Module) -> None:
        self.ctx = LayerPerturbation()
        self.adapters: dict[str, ZOActLinear] = wrap_linear_layers(
            model, self.cfg.method.target_modules, lambda name, linear: ZOActLinear(linear, self.cfg.method.rank, self.ctx,
                                                                                    tensor_key(f"{name}.zo_B")))

    def trainable(self) -> dict[str, nn.Parameter]:
        return {f"{n}.zo_B": a.zo_B for n, a in self.adapters.items()}

    def extra_state(self) -> dict[str, nn.Parameter]:
        return {f"{n}.zo_V": a.zo_V for n, a in self.adapters.items()}

    def setup(self, rt: Runtime, calibration_batches: list) -> None:
        self.shards = {n: rt.shard(n, p) for n, p in self.trainable().items()}
        if calibration_batches is not None:   # None: the bases come from a checkpoint
            self.compute_bases(rt, calibration_batches)
        self.estimate = DenseEstimate(self.shards, self.cfg)

    def compute_bases(self, rt: Runtime, batches: list) -> None:
        """V = top-r eigenvectors of Σ h hᵀ over the calibration data of all ranks (randomized power
        iteration on all-reduced sketches, then a Nyström step)."""
        m = self.cfg.method
        for name, a in self.adapters.items():
            n = a.base.in_features
            k = sketch_width(n, m.rank, m.basis_oversample)
            start = gaussian(mix(self.run_seed, _BASIS_STREAM), tensor_key(f"{name}.zo_V"), 0, n * k)
            a.sketch_q = orthonormalize(start.view(n, k).double())
        tokens = sum(int(b.token_mask().sum()) for b in batches)
        for it in range(m.basis_power_iters + 1):
            for a in self.adapters.values():
                a.sketch_s = torch.zeros_like(a.sketch_q)
            self.ctx.mode = "calibrate"
            for batch in batches:
                self.ctx.token_mask = batch.token_mask().reshape(-1)
                rt.forward(batch)
            self.ctx.off()
            flat = rt.all_reduce_sum(torch.cat([a.sketch_s.reshape(-1) for a in self.adapters.values()]
                                               + [torch.tensor([float(tokens)], dtype=torch.float64)]))
            total_tokens, offset = float(flat[-1]), 0
            for name, a in self.adapters.items():
                s = flat[offset:offset + a.sketch_s.numel()].view_as(a.sketch_s)
                offset += s.numel()
                if it < m.basis_power_iters:
                    a.sketch_q = orthonormalize(s)
                else:
                    v, evals = nystrom_basis(a.sketch_q, s, m.rank)
                    if m.basis_scale == "unit_rms":  # Vᵀh gets unit mean square over the calibration tokens
                        mean_sq = evals / total_tokens
                        v = v / mean_sq.clamp(min=1e-6 * float(mean_sq[0]) + 1e-30).sqrt()
                    shard = rt.shard(f"{name}.zo_V", a.zo_V)
                    shard.local.copy_(v.reshape(-1)[shard.start:shard.end].to(shard.local.dtype))
                    a.sketch_q = a.sketch_s = None

    def losses(self, t: int, dseed: int, batch, rt: Runtime) -> tuple[float, float, int]:
        eps = self.cfg.method.zo_eps
        if self.cfg.method.functional_perturbation:   # one forward over [batch; batch]: L+ and L-
            self.ctx.perturb(dseed, eps, sign=None)
            lp, lm, n = rt.loss_sums(batch, doubled=True)
        else:                                        # two forwards, +eps then -eps
            self.ctx.perturb(dseed, eps, sign=+1.0)
            lp, _, n = rt.loss_sums(batch, doubled=False)
            self.ctx.perturb(dseed, eps, sign=-1.0)
            lm, _, _ = rt.loss_sums(batch, doubled=False)
        self.ctx.off()
        return lp, lm, n

    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        self.estimate.accumulate(dseed, coeff)

    def update(self, t: int, lr: float) -> None:
        self.estimate.apply(lr)
