"""Dense directions on the 1-D tensors (norm scales and shifts, linear biases), applied functionally.

LOZO and AGZO perturb each 2-D weight along a low-rank direction and every 1-D tensor along a dense
Gaussian one (design §1). To keep L+ and L- in one forward over [batch; batch] (and nothing written into
the model while measuring), the 1-D perturbation is added to the layer output, which is linear in these
tensors:

    norm scale w:  (w ± εz) ⊙ x̂ + b  =  y ± ε z ⊙ x̂        x̂ = the normalised input, recomputed here
    shift/bias b:  y ± ε z

Supported: RMSNorm-like modules (class name ending in "RMSNorm", a 1-D `weight`, `variance_epsilon` or
`eps`) and torch.nn.LayerNorm; biases of the wrapped linear layers. Any other 1-D tensor stays frozen and
is listed by `unsupported_vectors` (the trainer logs it), rather than being perturbed on one path and not the
other.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dszo.directions import tensor_key
from dszo.methods.base import plain_shape
from dszo.methods.perturbation import Perturbation


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)


def _rms_eps(m: nn.Module) -> float:
    return float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))


class PerturbedNorm(nn.Module):
    """A norm layer whose scale (and shift) get the dense perturbation through its output."""

    def __init__(self, base: nn.Module, name: str, perturbation: Perturbation) -> None:
        super().__init__()
        self.base, self.name = base, name
        self.key_weight, self.key_bias = tensor_key(f"{name}.base.weight"), tensor_key(f"{name}.base.bias")
        object.__setattr__(self, "_perturbation", perturbation)  # shared state, not a submodule

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.LayerNorm):
            return F.layer_norm(x, self.base.normalized_shape, None, None, self.base.eps)
        h = x.to(torch.float32)                     # as HF's RMSNorm: normalise in fp32, cast back
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _rms_eps(self.base))).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        p = self._perturbation
        if not p.active:
            return y
        y = p.add(y, p.dense(self.key_weight, x.shape[-1], x.device) * self.normalised(x))
        if getattr(self.base, "bias", None) is not None:
            y = p.add(y, p.dense(self.key_bias, x.shape[-1], x.device))
        return y


def wrap_norms(model: nn.Module, perturbation: Perturbation) -> dict[str, nn.Parameter]:
    """Wrap every supported norm layer; returns name -> 1-D parameter (scale, and shift where present)."""
    params = {}
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) or _is_rms_norm(m)]
    for name, norm in targets:
        if isinstance(norm, nn.LayerNorm) and norm.weight is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PerturbedNorm(norm, name, perturbation))
        params[f"{name}.base.weight"] = norm.weight
        if getattr(norm, "bias", None) is not None:
            params[f"{name}.base.bias"] = norm.bias
    return params


def perturb_bias(perturbation: Perturbation, y: torch.Tensor, bias_key: int, linear: nn.Linear) -> torch.Tensor:
    """y ± εz of a wrapped linear layer's bias (no-op without a bias or perturbation); bias_key: the tensor_key
    of `<layer>.base.bias`."""
    if not perturbation.active or linear.bias is None:
        return y
    return perturbation.add(y, perturbation.dense(bias_key, linear.out_features, y.device))


def unsupported_vectors(model: nn.Module, trained: dict[str, nn.Parameter],
                        shape_of: Callable = plain_shape) -> list[str]:
    """1-D parameters that stay frozen because no functional perturbation is known for their module."""
    ids = {id(p) for p in trained.values()}
    return [n for n, p in model.named_parameters() if len(shape_of(p)) == 1 and id(p) not in ids]


def train_vectors(model: nn.Module, enabled: bool, linears: dict, perturbation: Perturbation,
                  shape_of: Callable = plain_shape) -> tuple[dict[str, nn.Parameter], list[str]]:
    """The 1-D tensors trained with dense directions -- every supported norm's scale/shift and the biases of
    the wrapped linear layers -- and the 1-D tensors left frozen for want of a functional perturbation
    (none of either when `enabled` is false)."""
    if not enabled:
        return {}, []
    vectors = wrap_norms(model, perturbation)
    vectors.update({f"{n}.base.bias": w.base.bias for n, w in linears.items() if w.base.bias is not None})
    return vectors, unsupported_vectors(model, vectors, shape_of)
