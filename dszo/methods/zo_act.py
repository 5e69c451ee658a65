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

from dszo.directions import gaussian, mix, tensor_key
from dszo.errors import ConfigError
from dszo.methods.base import Capabilities, MethodConfig, ZOMethod, ZORuntime, plain_shape
from dszo.methods.estimates import DenseEstimate, DenseEstimateState
from dszo.methods.layers import wrap_linear_layers
from dszo.methods.perturbation import Perturbation
from dszo.methods.registry import register
from dszo.subspace import nystrom_basis, orthonormalize, sketch_width

_BASIS_STREAM = 0xBA515


@dataclass
class ZOActConfig(MethodConfig):
    name: str = "zo_act"
    # Rank r of each layer's activation basis, and which linear layers get coefficients
    # (module-name suffixes as in PEFT; "all-linear" = every nn.Linear except the LM head).
    rank: int = 1
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Only the target modules in these blocks (PEFT's layers_to_transform; negative: from the last block, so the
    # same list means the same part of a model of any depth); None: every block.
    layers_to_transform: Optional[list[int]] = None
    num_calibration: int = 64          # training examples (over all ranks) the bases are computed from
    calibration_batch_size: int = 16
    basis_power_iters: int = 1         # the calibration data is read basis_power_iters + 1 times
    basis_oversample: int = 8          # sketch width k = rank + basis_oversample (exact when k >= n)
    # output_rms (default): each basis vector scaled so that Vᵀh has the mean square of the layer's own output W h,
    # which makes zo_eps and the learning rate fractions of each layer's output, in every layer of any model: the
    # published orthonormal basis let the same eps perturb Gemma 3's layers ~20x more than SmolLM2's, and the
    # recipe tuned on one did not learn on the other (README, "Basis scale"). orthonormal: the top-r eigenvectors
    # as they are (the method as published). unit_rms: Vᵀh with unit mean square over the calibration tokens.
    basis_scale: Literal["orthonormal", "unit_rms", "output_rms"] = "output_rms"
    # Recompute the bases every N steps (0: never), on that step's batches under the trained adapters, each B
    # re-expressed in its new basis (see ZOAct.refresh_bases). The basis drifts as B trains: after 100 steps at
    # lr 1e-2 the down_proj bases' |cos| with the first ones fell to 0.60 (benchmarks/results/basis_drift.json).
    basis_refresh_steps: int = 0

    def capabilities(self) -> Capabilities:
        # a refreshed basis comes from the step's activations, not from (seed, g, lr): no seed replay
        return Capabilities(result_file="adapter.safetensors", exports_adapter=True,
                            calibration_examples=self.num_calibration, replayable=self.basis_refresh_steps == 0)

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ConfigError(f"method.rank must be >= 1, got {self.rank}")
        if self.num_calibration < 1 or self.calibration_batch_size < 1:
            raise ConfigError("method.num_calibration and method.calibration_batch_size must be >= 1")
        if self.basis_power_iters < 0 or self.basis_oversample < 0:
            raise ConfigError("method.basis_power_iters and method.basis_oversample must be >= 0")
        if self.basis_refresh_steps < 0:
            raise ConfigError(f"method.basis_refresh_steps must be >= 0 (0: never), got {self.basis_refresh_steps}")


class Calibration:
    """Shared by the adapted layers while the bases are computed: on, and which tokens of the batch count."""

    def __init__(self) -> None:
        self.active = False
        self.token_mask: Optional[torch.Tensor] = None


class ZOActLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, perturbation: Perturbation, calibration: Calibration,
                 key_B: int) -> None:
        super().__init__()
        self.base = base
        self.zo_V = nn.Parameter(torch.zeros(base.in_features, rank), requires_grad=False)
        self.zo_B = nn.Parameter(torch.zeros(base.out_features, rank), requires_grad=False)
        object.__setattr__(self, "_perturbation", perturbation)  # shared state, not submodules
        object.__setattr__(self, "_calibration", calibration)
        self.key_B = key_B  # directions.tensor_key of this layer's B
        self.sketch_q: Optional[torch.Tensor] = None   # calibration iterate (n x k), not sharded
        self.sketch_s: Optional[torch.Tensor] = None
        self.output_sq: Optional[torch.Tensor] = None  # Σ over calibration tokens of ‖W h‖² (basis_scale output_rms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self._calibration.active:   # and the adapter below: a refresh sketches the trained model's activations
            h = x.reshape(-1, x.shape[-1])[self._calibration.token_mask].to(self.sketch_q.dtype)
            self.sketch_s += h.T @ (h @ self.sketch_q)
            self.output_sq += y.reshape(-1, y.shape[-1])[self._calibration.token_mask].double().square().sum()
        h = x.to(self.zo_V.dtype) @ self.zo_V                 # [..., r]: the only projection of x formed
        b, p = self.zo_B, self._perturbation
        if not p.active:
            return y.add_((h @ b.T).to(y.dtype))              # in place: no second output-sized buffer
        z = p.dense(self.key_B, b.numel(), h.device).view(b.shape)
        for rows, sign in p.row_signs(x.shape[0]):            # (B ± εZ) on the rows measured at θ ± εZ
            y[rows] += (h[rows] @ (b + (sign * p.eps) * z).T).to(y.dtype)
        return y


class ZOAct(DenseEstimateState, ZOMethod):
    name = "zo_act"

    def attach(self, model: nn.Module, shape_of=plain_shape) -> None:
        self.perturbation, self.calibration = Perturbation(self.cfg.method.directions), Calibration()
        # per layer: RMS of the top orthonormal projection / RMS of the layer's output; eps and the rate act on
        # each layer in proportion to it unless basis_scale is output_rms (medians: SmolLM2 1.7, Gemma 3 31;
        # benchmarks/results/basis_scales.json)
        self.scale_ratio: dict[str, float] = {}
        self.adapters: dict[str, ZOActLinear] = wrap_linear_layers(
            model, self.cfg.method.target_modules, lambda name, linear: ZOActLinear(
                linear, self.cfg.method.rank, self.perturbation, self.calibration, tensor_key(f"{name}.zo_B")),
            self.cfg.method.layers_to_transform)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {f"{n}.zo_B": a.zo_B for n, a in self.adapters.items()}

    def extra_state(self) -> dict[str, nn.Parameter]:
        return {f"{n}.zo_V": a.zo_V for n, a in self.adapters.items()}

    def prepare(self, runtime: ZORuntime, calibration_batches: list | None) -> None:
        if calibration_batches is not None:   # None: the bases come from a checkpoint
            self.compute_bases(runtime, calibration_batches)
        self.estimate = DenseEstimate(self.partitions, self.cfg)

    def compute_bases(self, runtime: ZORuntime, batches: list) -> dict[str, torch.Tensor]:
        """V = top-r eigenvectors of Σ h hᵀ over the calibration data of all ranks (randomized power
        iteration on all-reduced sketches, then a Nyström step). Returns every layer's whole V (float64)."""
        m = self.cfg.method
        for name, a in self.adapters.items():
            n = a.base.in_features
            k = sketch_width(n, m.rank, m.basis_oversample)
            start = gaussian(mix(self.run_seed, _BASIS_STREAM), tensor_key(f"{name}.zo_V"), 0, n * k)
            # drawn on the CPU (the same start on every device), iterated on the layer's own device
            a.sketch_q = orthonormalize(start.view(n, k).double().to(a.zo_V.device))
        tokens = sum(int(b.token_mask().sum()) for b in batches)
        bases = {}
        for it in range(m.basis_power_iters + 1):
            flat = self._sketch_pass(runtime, batches, tokens)
            total_tokens, offset = float(flat[-1]), 0
            for name, a in self.adapters.items():
                s = flat[offset:offset + a.sketch_s.numel()].view_as(a.sketch_s)
                output_ms = float(flat[offset + s.numel()]) / (total_tokens * a.base.out_features)
                offset += s.numel() + 1
                if it < m.basis_power_iters:
                    a.sketch_q = orthonormalize(s)
                else:
                    bases[name] = self._set_basis(runtime, name, a, s, total_tokens, output_ms)
        return bases

    def _sketch_pass(self, runtime: ZORuntime, batches: list, tokens: int) -> torch.Tensor:
        """Σ h hᵀ Q and Σ ‖W h‖² of every layer over this rank's calibration batches, all-reduced (with the token
        count)."""
        for a in self.adapters.values():
            a.sketch_s = torch.zeros_like(a.sketch_q)
            a.output_sq = torch.zeros(1, dtype=a.sketch_q.dtype, device=a.sketch_q.device)
        self.calibration.active = True
        try:
            for batch in batches:
                self.calibration.token_mask = batch.token_mask().reshape(-1)
                runtime.forward(batch)
        finally:
            self.calibration.active = False
        sketches = [t for a in self.adapters.values() for t in (a.sketch_s.reshape(-1), a.output_sq)]
        count = torch.tensor([float(tokens)], dtype=torch.float64, device=sketches[0].device)
        return runtime.all_reduce_sum(torch.cat(sketches + [count]))

    def _set_basis(self, runtime: ZORuntime, name: str, a: ZOActLinear, sketch: torch.Tensor,
                   total_tokens: float, output_ms: float) -> torch.Tensor:
        m = self.cfg.method
        v, evals = nystrom_basis(a.sketch_q, sketch, m.rank)
        self.scale_ratio[name] = (float(evals[0]) / total_tokens / max(output_ms, 1e-30)) ** 0.5
        if m.basis_scale != "orthonormal":  # Vᵀh gets mean square 1 (unit_rms) or W h's (output_rms)
            mean_sq = evals / total_tokens
            target = 1.0 if m.basis_scale == "unit_rms" else output_ms
            v = v * (target / mean_sq.clamp(min=1e-6 * float(mean_sq[0]) + 1e-30)).sqrt()
        part = runtime.partition(f"{name}.zo_V", a.zo_V)
        part.local.copy_(v.reshape(-1)[part.start:part.end].to(part.local.dtype))
        a.sketch_q = a.sketch_s = a.output_sq = None
        return v.to(part.local.dtype).double()   # the V the layers use, rounded as stored

    def setup_metrics(self) -> dict:
        ratios = sorted(self.scale_ratio.values())
        if not ratios:
            return {}
        return {"basis_projection_to_output_rms": {"min": ratios[0], "median": ratios[len(ratios) // 2],
                                                   "max": ratios[-1], "basis_scale": self.cfg.method.basis_scale}}

    def begin_step(self, t: int, micro_batches: list, runtime: ZORuntime) -> None:
        every = self.cfg.method.basis_refresh_steps
        if every and t and t % every == 0:
            self.refresh_bases(runtime, micro_batches)

    def refresh_bases(self, runtime: ZORuntime, batches: list) -> None:
        """New bases from `batches` (this step's, on every rank) under the current adapters, and every B
        re-expressed in its layer's new basis: B' = B T, T = VᵀV' (V'ᵀV')⁻¹, the least-squares fit of B'V'ᵀ to
        BVᵀ -- the layer's function is unchanged on the span the old and new bases share, and loses only the part
        of BVᵀ the new basis no longer spans. Adam's moments follow the coefficients: m T and v (T∘T) (exact
        where T is a signed permutation, as when a basis vector only changes sign or order)."""
        old = {n: self.fixed_partitions[f"{n}.zo_V"].local.to(torch.float64, copy=True) for n in self.adapters}
        new = self.compute_bases(runtime, batches)
        r = self.cfg.method.rank
        cross = []   # VᵀV' from this rank's elements of V (row-major n x r), summed over ranks
        for n, v in new.items():
            part = self.fixed_partitions[f"{n}.zo_V"]
            idx = torch.arange(part.start, part.end, device=v.device)
            cross.append(torch.zeros(r, r, dtype=torch.float64, device=v.device)
                         .index_add_(0, idx % r, old[n].to(v.device)[:, None] * v[idx // r]).reshape(-1))
        cross = runtime.all_reduce_sum(torch.cat(cross)).view(-1, r, r)
        self._mix_coefficients(runtime, {n: torch.linalg.solve(v.T @ v, c.T).T   # c (V'ᵀV')⁻¹; V'ᵀV' symmetric
                                         for (n, v), c in zip(new.items(), cross)})

    def _mix_coefficients(self, runtime: ZORuntime, mix: dict[str, torch.Tensor]) -> None:
        """B ← B T per layer, with Adam's moments, on this rank's slices of the row-major m x r tensors: each
        tensor is assembled whole by one all-reduce (they are small: the trained coefficients), mixed, re-sliced."""
        state = self.estimate.optimizer.state
        pieces = []   # (this rank's slice, the partition, T or T∘T)
        for n, t in mix.items():
            part = self.partitions[f"{n}.zo_B"]
            pieces.append((part.local, part, t))
            pieces += [(moment, part, t * t if key == "exp_avg_sq" else t)
                       for key, moment in sorted(state.get(f"{n}.zo_B", {}).items())]
        sizes = [part.numel for _, part, _ in pieces]
        whole = torch.zeros(sum(sizes), dtype=torch.float64, device=pieces[0][0].device)
        offset = 0
        for (local, part, _), size in zip(pieces, sizes):
            whole[offset + part.start:offset + part.end] = local.double()
            offset += size
        whole, offset = runtime.all_reduce_sum(whole), 0
        for (local, part, t), size in zip(pieces, sizes):
            mixed = whole[offset:offset + size].view(part.shape) @ t.to(whole.device)
            local.copy_(mixed.reshape(-1)[part.start:part.end])
            offset += size

    def losses(self, t: int, dseed: int, batch, runtime: ZORuntime) -> tuple[float, float, int]:
        m = self.cfg.method   # functional: one forward over [batch; batch] gives L+ and L-; else two forwards
        return self.perturbation.measure(runtime, batch, dseed, m.zo_eps, doubled=m.functional_perturbation)

    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        self.estimate.accumulate(dseed, coeff)

    def update(self, t: int, lr: float) -> None:
        self.estimate.apply(lr)


register(ZOActConfig, ZOAct)
