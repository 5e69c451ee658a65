"""AGZO: activation-guided low-rank directions, recomputed every step; one-sided estimator.

Per step: an unperturbed forward f0 = L(θ) captures each target linear layer's input activations H.
A = the dominant r-dimensional subspace of HᵀH (power iterations + QR from a start Ω shared through the
seed) -- every sketch HᵀH Q is all-reduced so that all ranks perturb in the same subspace (the one
per-step collective larger than a scalar; its bytes show up in the metrics). Then Z = R Aᵀ with R (m x r)
Gaussian, f+ = L(θ + μZ) applied functionally (W x + μ R (Aᵀ x)), g = (f+ - f0) / μ, and each rank writes
W ← W - η g R Aᵀ into its own partition of W. The 1-D tensors (norms, biases; `train_1d`) get dense
directions in the same forward (vectors.py) and plain SGD.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dszo.config import ConfigError, MethodConfig, register_method_config
from dszo.directions import gaussian, mix, tensor_key
from dszo.methods.base import Runtime, ZOMethod, register, require_sgd
from dszo.methods.lozo import apply_low_rank_rows, shard_rows, train_vectors
from dszo.methods.layers import wrap_linear_layers
from dszo.methods.vectors import VectorEstimate, VectorPerturbation, perturb_bias
from dszo.quantization import refuse
from dszo.subspace import orthonormalize

_OMEGA_STREAM = 0xA620


@register_method_config("agzo")
@dataclass
class AGZOConfig(MethodConfig):
    name: str = "agzo"
    zo_eps: float = 1e-3                   # μ of the one-sided estimate
    rank: int = 1
    power_iters: int = 3
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    train_1d: bool = True                  # also train norm scales and biases, with dense directions

    def check_model(self, model) -> None:
        refuse(self.name, model.quantization, "writes its update R Aᵀ into the base weights")

    def validate(self) -> None:
        super().validate()
        if self.rank < 1 or self.power_iters < 0:
            raise ConfigError("method.rank must be >= 1 and method.power_iters >= 0")


class ActivationGuidedLinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, owner: "AGZO") -> None:
        super().__init__()
        self.base, self.name = base, name
        object.__setattr__(self, "_owner", owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self._owner
        y = perturb_bias(o.vctx, self.base(x), self.name.removesuffix(".base.weight"), self.base)
        if o.mode == "capture":
            o.captured[self.name] = x.reshape(-1, x.shape[-1])[o.token_mask].detach().to(torch.float32)
        elif o.mode == "perturb":
            r, a = o.R[self.name].to(x.device), o.A[self.name].to(x.device)
            y.add_((o.cfg.method.zo_eps * ((x.to(a.dtype) @ a) @ r.T)).to(y.dtype))
        return y


@register
class AGZO(ZOMethod):
    name = "agzo"

    def __init__(self, cfg, run_seed: int) -> None:
        super().__init__(cfg, run_seed)
        require_sgd(cfg, "R Aᵀ")
        if cfg.gradient_accumulation_steps != 1:
            raise ConfigError("method agzo computes its subspace from one batch: set gradient_accumulation_steps: 1")
        self.mode, self.captured, self.R, self.A, self.token_mask = "off", {}, {}, {}, None
        self.vctx = VectorPerturbation()
        self.subspace_step = -1

    def attach(self, model: nn.Module) -> None:
        wrapped = wrap_linear_layers(model, self.cfg.method.target_modules,
                                     lambda name, linear: ActivationGuidedLinear(linear, f"{name}.base.weight", self))
        self.layers: dict[str, ActivationGuidedLinear] = {w.name: w for w in wrapped.values()}
        self.vectors, self.frozen_1d = train_vectors(model, self.cfg.method.train_1d, wrapped, self.vctx)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {**{n: layer.base.weight for n, layer in self.layers.items()}, **self.vectors}

    def setup(self, rt: Runtime, calibration_batches: list) -> None:
        self.shards = {n: rt.shard(n, p) for n, p in self.trainable().items()}
        self.vector_estimate = VectorEstimate({n: self.shards[n] for n in self.vectors})
        self.step_dir: dict[str, torch.Tensor] = {}

    def _subspaces(self, t: int, rt: Runtime) -> None:
        """A per layer from the activations of all ranks: QR(HᵀH Q) repeated, every sketch all-reduced."""
        r = self.cfg.method.rank
        q = {}
        for name, layer in self.layers.items():
            n = layer.base.in_features
            q[name] = gaussian(mix(self.run_seed, _OMEGA_STREAM, t), tensor_key(name), 0, n * r).view(n, r)
        for _ in range(self.cfg.method.power_iters + 1):
            sketches = [self.captured[n].T @ (self.captured[n] @ q[n]) for n in self.layers]
            flat = rt.all_reduce_sum(torch.cat([s.reshape(-1) for s in sketches]))
            offset = 0
            for name, s in zip(self.layers, sketches):
                q[name] = orthonormalize(flat[offset:offset + s.numel()].view_as(s).double()).float()
                offset += s.numel()
        self.A = q

    def losses(self, t: int, dseed: int, batch, rt: Runtime) -> tuple[float, float, int]:
        r = self.cfg.method.rank
        if self.subspace_step != t:                       # f0 and the subspace once per step, shared by directions
            self.mode, self.token_mask = "capture", batch.token_mask().reshape(-1)
            self.f0, _, self.n = rt.loss_sums(batch, doubled=False)
            self.mode = "off"
            self._subspaces(t, rt)
            self.captured.clear()
            self.subspace_step = t
        self.R = {name: gaussian(dseed, self.shards[name].key, 0, self.shards[name].shape[0] * r)
                  .view(self.shards[name].shape[0], r) for name in self.layers}
        self.mode = "perturb"
        self.vctx.set(dseed, self.cfg.method.zo_eps, +1.0)
        try:
            fp, _, _ = rt.loss_sums(batch, doubled=False)
        finally:
            self.mode = "off"
            self.vctx.off()
        return fp, self.f0, self.n

    def projected_gradient(self, a: float, b: float, n: float) -> float:
        """One-sided: (L(θ + μZ) - L(θ)) / μ."""
        return (a - b) / n / self.cfg.method.zo_eps

    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        self.vector_estimate.accumulate(dseed, coeff)
        for name, rmat in self.R.items():
            self.step_dir[name] = coeff * rmat if name not in self.step_dir else self.step_dir[name].add_(rmat, alpha=coeff)

    def discard(self) -> None:
        self.vector_estimate.discard()
        self.step_dir.clear()

    def update(self, t: int, lr: float) -> None:
        self.vector_estimate.apply(lr)
        for name in self.layers:
            s = self.shards[name]
            r0, r1 = shard_rows(s)
            apply_low_rank_rows(s, self.step_dir.pop(name)[r0:r1], self.A[name], lr)
