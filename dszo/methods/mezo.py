"""MeZO: dense Gaussian directions over the trainable tensors themselves (full fine-tuning).

Each rank perturbs, in place, only the partition of each weight that ZeRO-3 assigned to it
(θ_k ± εZ_k); the next forward gathers the perturbed tensors as usual. Restoring is exact: the
unperturbed partition is copied aside once per measurement and copied back (θ+εz-2εz+εz is not θ in
floating point). Two forwards per direction: a dense perturbation cannot be applied to half a batch.
Weight decay, as in the reference implementation, skips 1-D tensors (biases, norms).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from dszo.directions import gaussian
from dszo.errors import ConfigError
from dszo.methods.base import Capabilities, MethodConfig, ZOMethod, ZORuntime, plain_shape, refuse_quantized
from dszo.methods.estimates import DenseEstimate, DenseEstimateState
from dszo.methods.registry import register
from dszo.quantization import is_quantized

SUBSET_HINT = "restrict method.trainable to unquantized tensors (e.g. ['*norm*']), "


@dataclass
class MeZOConfig(MethodConfig):
    name: str = "mezo"
    zo_eps: float = 1e-3
    # Which parameters are trained: fnmatch patterns over parameter names ("*" = all of them).
    trainable: list[str] = field(default_factory=lambda: ["*"])

    def capabilities(self) -> Capabilities:
        return Capabilities(writes_base_weights=True)   # its quantized tensors are refused at attach

    def check_model(self, model) -> None:
        if "*" in self.trainable:   # all parameters: certainly the quantized linear weights (others: at attach)
            refuse_quantized(self.name, model.quantization, "with method.trainable ['*'] writes into every weight",
                             SUBSET_HINT)

    def validate(self) -> None:
        super().validate()
        if not self.trainable:
            raise ConfigError("method.trainable must name at least one parameter pattern")


def select_parameters(model: nn.Module, patterns: list[str], method: str, quantization: str) -> dict[str, nn.Parameter]:
    """Parameters whose names match any fnmatch pattern (tied tensors appear once); quantized ones refused."""
    params = {n: p for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not params:
        raise ValueError(f"method.trainable {patterns} matched no parameter of the model")
    quantized = [n for n, p in params.items() if is_quantized(p)]
    if quantized:
        refuse_quantized(method, quantization, f"would write into {len(quantized)} quantized tensors matched by "
                                               f"method.trainable {patterns} (e.g. {quantized[0]})", SUBSET_HINT)
    return params


class MeZO(DenseEstimateState, ZOMethod):
    name = "mezo"

    def attach(self, model: nn.Module, shape_of=plain_shape) -> None:
        self.params = select_parameters(model, self.cfg.method.trainable, self.name, self.cfg.model.quantization)

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.params

    def prepare(self, runtime: ZORuntime, calibration_batches: list | None) -> None:
        no_decay = frozenset(n for n, p in self.partitions.items() if len(p.shape) < 2)
        self.estimate = DenseEstimate(self.partitions, self.cfg, no_decay=no_decay)
        self.backup = {n: torch.empty_like(p.local) for n, p in self.partitions.items()}

    def _perturb(self, dseed: int, scale: float) -> None:
        """θ ± εZ from the saved θ, a slice at a time (Z is regenerated, never held at the partition's size)."""
        for name, part in self.partitions.items():
            for lo in range(0, part.local.numel(), DenseEstimate.SLICE):
                hi = min(part.local.numel(), lo + DenseEstimate.SLICE)
                z = gaussian(dseed, part.key, part.start + lo, part.start + hi, dtype=part.local.dtype,
                             device=part.local.device)
                part.local[lo:hi].copy_(self.backup[name][lo:hi]).add_(z, alpha=scale)

    def losses(self, t: int, dseed: int, batch, runtime: ZORuntime) -> tuple[float, float, int]:
        eps = self.cfg.method.zo_eps
        for name, part in self.partitions.items():
            self.backup[name].copy_(part.local)
        try:
            self._perturb(dseed, +eps)
            lp, _, n = runtime.loss_sums(batch, doubled=False)
            self._perturb(dseed, -eps)
            lm, _, _ = runtime.loss_sums(batch, doubled=False)
        finally:
            for name, part in self.partitions.items():
                part.local.copy_(self.backup[name])
        return lp, lm, n

    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        self.estimate.accumulate(dseed, coeff)

    def update(self, t: int, lr: float) -> None:
        self.estimate.apply(lr)


register(MeZOConfig, MeZO)
