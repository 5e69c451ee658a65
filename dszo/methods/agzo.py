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
from typing import ClassVar

import torch
from torch import nn

from dszo.directions import direction, gaussian, mix, tensor_key
from dszo.errors import ConfigError
from dszo.methods.base import Capabilities, MethodConfig, ZOMethod, ZORuntime, plain_shape, require_sgd
from dszo.methods.estimates import VectorEstimate, apply_low_rank_rows, partition_rows
from dszo.methods.layers import wrap_linear_layers
from dszo.methods.perturbation import Perturbation
from dszo.methods.registry import register
from dszo.methods.vectors import perturb_bias, train_vectors
from dszo.subspace import orthonormalize

_OMEGA_STREAM = 0xA620


@dataclass
class AGZOConfig(MethodConfig):
    name: str = "agzo"
    zo_eps: float = 1e-3                   # μ of the one-sided estimate
    rank: int = 1
    power_iters: int = 3
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    train_1d: bool = True                  # also train norm scales and biases, with dense directions

    base_update: ClassVar[str] = "writes its update R Aᵀ into the base weights"

    def capabilities(self) -> Capabilities:
        # Not replayable: its subspace comes from each step's activations, not from the seed alone.
        # One f0 a step, shared by its directions, then f+ per direction.
        return Capabilities(writes_base_weights=True, replayable=False, forwards_per_direction=1, forwards_per_step=1)

    def validate(self) -> None:
        super().validate()
        if self.rank < 1 or self.power_iters < 0:
            raise ConfigError("method.rank must be >= 1 and method.power_iters >= 0")


class Capture:
    """Shared by the layers during the unperturbed forward f0: their input activations, on the valid tokens."""

    def __init__(self) -> None:
        self.active = False
        self.token_mask: torch.Tensor | None = None
        self.inputs: dict[str, torch.Tensor] = {}


class ActivationGuidedLinear(nn.Module):
    """Captures its input during f0; adds μ R (Aᵀ x) (and the bias' dense term) during f+."""

    def __init__(self, base: nn.Linear, name: str, perturbation: Perturbation, capture: Capture) -> None:
        super().__init__()
        self.base, self.name = base, name       # name: the weight's, `<layer>.base.weight`
        self.key_bias = tensor_key(f"{name.removesuffix('.base.weight')}.base.bias")
        object.__setattr__(self, "_perturbation", perturbation)   # shared state, not submodules
        object.__setattr__(self, "_capture", capture)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, capture = self._perturbation, self._capture
        y = perturb_bias(p, self.base(x), self.key_bias, self.base)
        if capture.active:
            capture.inputs[self.name] = x.reshape(-1, x.shape[-1])[capture.token_mask].detach().to(torch.float32)
        elif p.active:
            r, a = (d.to(x.device) for d in p.directions[self.name])
            y = p.add(y, (x.to(a.dtype) @ a) @ r.T)
        return y


class AGZO(ZOMethod):
    name = "agzo"

    def __init__(self, cfg, run_seed: int) -> None:
        super().__init__(cfg, run_seed)
        require_sgd(cfg, "R Aᵀ")
        if cfg.gradient_accumulation_steps != 1:
            raise ConfigError("method agzo computes its subspace from one batch: set gradient_accumulation_steps: 1")
        self.perturbation, self.capture = Perturbation(cfg.method.directions), Capture()
        self.A: dict[str, torch.Tensor] = {}
        self.f0: dict[int, tuple] = {}   # id(batch) -> (Σ f0, n) of this step's micro-batches

    def attach(self, model: nn.Module, shape_of=plain_shape) -> None:
        wrapped = wrap_linear_layers(model, self.cfg.method.target_modules, lambda name, linear: ActivationGuidedLinear(
            linear, f"{name}.base.weight", self.perturbation, self.capture))
        self.layers: dict[str, ActivationGuidedLinear] = {w.name: w for w in wrapped.values()}
        self.vectors, self.frozen_1d = train_vectors(model, self.cfg.method.train_1d, wrapped, self.perturbation,
                                                     shape_of)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {**{n: layer.base.weight for n, layer in self.layers.items()}, **self.vectors}

    def prepare(self, runtime: ZORuntime, calibration_batches: list | None) -> None:
        self.vector_estimate = VectorEstimate({n: self.partitions[n] for n in self.vectors},
                                              kind=self.cfg.method.directions)
        self.step_dir: dict[str, torch.Tensor] = {}

    def _subspaces(self, t: int, runtime: ZORuntime) -> None:
        """A per layer from the activations of all ranks: QR(HᵀH Q) repeated, every sketch all-reduced."""
        r, h = self.cfg.method.rank, self.capture.inputs
        q = {}
        for name, layer in self.layers.items():
            n = layer.base.in_features
            q[name] = gaussian(mix(self.run_seed, _OMEGA_STREAM, t), tensor_key(name), 0, n * r).view(n, r).to(
                h[name].device)   # drawn on the CPU (the same start on every device), used on the activations' device
        for _ in range(self.cfg.method.power_iters + 1):
            sketches = [h[n].T @ (h[n] @ q[n]) for n in self.layers]
            flat = runtime.all_reduce_sum(torch.cat([s.reshape(-1) for s in sketches]))
            offset = 0
            for name, s in zip(self.layers, sketches):
                q[name] = orthonormalize(flat[offset:offset + s.numel()].view_as(s).double()).float()
                offset += s.numel()
        self.A = q

    def begin_step(self, t: int, micro_batches: list, runtime: ZORuntime) -> None:
        """f0 of each of this rank's micro-batches (one per direction slot) and the step's subspaces from all of
        their activations, shared by the step's directions."""
        self.f0, captured = {}, {}
        for batch in micro_batches:
            self.capture.active, self.capture.token_mask = True, batch.token_mask().reshape(-1)
            try:
                f0, _, n = runtime.loss_sums(batch, doubled=False)
            finally:
                self.capture.active = False
            self.f0[id(batch)] = (f0, n)
            for name, h in self.capture.inputs.items():
                captured.setdefault(name, []).append(h)
        self.capture.inputs = {name: hs[0] if len(hs) == 1 else torch.cat(hs) for name, hs in captured.items()}
        self._subspaces(t, runtime)
        self.capture.inputs.clear()

    def losses(self, t: int, dseed: int, batch, runtime: ZORuntime) -> tuple[float, float, int]:
        r = self.cfg.method.rank
        for name in self.layers:   # the whole R of this direction: the forward perturbs every row of the layer
            part = self.partitions[name]
            rows = direction(self.cfg.method.directions, dseed, part.key, 0, part.shape[0] * r,
                             device=part.local.device).view(part.shape[0], r)
            self.perturbation.directions[name] = (rows, self.A[name])
        fp, _ = self.perturbation.measure_one_sided(runtime, batch, dseed, self.cfg.method.zo_eps)
        f0, n = self.f0[id(batch)]
        return fp, f0, n

    def projected_gradient(self, a: float, b: float, n: float) -> float:
        """One-sided: (L(θ + μZ) - L(θ)) / μ."""
        return (a - b) / n / self.cfg.method.zo_eps

    def _r_rows(self, dseed: int, name: str) -> torch.Tensor:
        """Rows partition_rows(part) of direction dseed's R: what this rank's update needs, regenerated from the
        seed (a step's other directions -- other groups' slots -- were never measured here)."""
        r, part = self.cfg.method.rank, self.partitions[name]
        r0, r1 = partition_rows(part)
        return direction(self.cfg.method.directions, dseed, part.key, r0 * r, r1 * r,
                         device=part.local.device).view(r1 - r0, r)

    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        self.vector_estimate.accumulate(dseed, coeff)
        for name in self.layers:
            rows = self._r_rows(dseed, name)
            self.step_dir[name] = coeff * rows if name not in self.step_dir else self.step_dir[name].add_(rows, alpha=coeff)

    def discard(self) -> None:
        self.vector_estimate.discard()
        self.step_dir.clear()

    def update(self, t: int, lr: float) -> None:
        self.vector_estimate.apply(lr)
        for name in self.layers:
            apply_low_rank_rows(self.partitions[name], self.step_dir.pop(name), self.A[name], lr)


register(AGZOConfig, AGZO)
