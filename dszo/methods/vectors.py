"""Dense directions on the 1-D tensors (norm scales and shifts, linear biases), applied functionally.

LOZO and AGZO perturb each 2-D weight along a low-rank direction and every 1-D tensor along a dense
Gaussian one (design §1). To keep L+ and L- in one forward over [batch; batch] (and nothing written into
the model while measuring), the 1-D perturbation is added to the layer output, which is linear in these
tensors:

    norm scale w:  (w ± εz) ⊙ x̂ + b  =  y ± ε z ⊙ x̂        x̂ = the normalised input, recomputed here
    shift/bias b:  y ± ε z

Supported: RMSNorm-like modules (class name ending in "RMSNorm", a 1-D `weight`, `variance_epsilon` or
`eps`) and torch.nn.LayerNorm; biases of the wrapped linear layers. Any other 1-D tensor stays frozen and
is listed by `unsupported_vectors` (train.py logs it), rather than being perturbed on one path and not the
other.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dszo.directions import gaussian, tensor_key


class VectorPerturbation:
    """Shared by the wrappers: the direction seed and ε of the current forward (off when not active)."""

    def __init__(self) -> None:
        self.active = False
        self.seed, self.eps = 0, 0.0
        self.sign: Optional[float] = None          # None: doubled batch, +ε on the first half, -ε on the second
        self._z: dict[int, torch.Tensor] = {}

    def set(self, seed: int, eps: float, sign: Optional[float]) -> None:
        if seed != self.seed:
            self._z.clear()
        self.active, self.seed, self.eps, self.sign = True, seed, eps, sign

    def off(self) -> None:
        self.active = False
        self._z.clear()

    def z(self, name: str, numel: int, device) -> torch.Tensor:
        key = tensor_key(name)
        if key not in self._z:
            self._z[key] = gaussian(self.seed, key, 0, numel, device=device)
        return self._z[key]

    def add(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """y ± ε·delta in place (delta broadcasts over y), by halves on a doubled batch."""
        e = self.eps * delta
        if self.sign is None:
            half = y.shape[0] // 2
            y[:half] += e[:half].to(y.dtype) if e.dim() == y.dim() else e.to(y.dtype)
            y[half:] -= e[half:].to(y.dtype) if e.dim() == y.dim() else e.to(y.dtype)
            return y
        return y.add_((self.sign * e).to(y.dtype))


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)


def _rms_eps(m: nn.Module) -> float:
    return float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))


class PerturbedNorm(nn.Module):
    """A norm layer whose scale (and shift) get the dense perturbation through its output."""

    def __init__(self, base: nn.Module, name: str, ctx: VectorPerturbation) -> None:
        super().__init__()
        self.base, self.name = base, name
        object.__setattr__(self, "_ctx", ctx)

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.LayerNorm):
            return F.layer_norm(x, self.base.normalized_shape, None, None, self.base.eps)
        h = x.to(torch.float32)                     # as HF's RMSNorm: normalise in fp32, cast back
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _rms_eps(self.base))).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self._ctx
        if not ctx.active:
            return y
        w = f"{self.name}.base.weight"
        y = ctx.add(y, ctx.z(w, x.shape[-1], x.device) * self.normalised(x))
        if getattr(self.base, "bias", None) is not None:
            y = ctx.add(y, ctx.z(f"{self.name}.base.bias", x.shape[-1], x.device))
        return y


def wrap_norms(model: nn.Module, ctx: VectorPerturbation) -> dict[str, nn.Parameter]:
    """Wrap every supported norm layer; returns name -> 1-D parameter (scale, and shift where present)."""
    params = {}
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) or _is_rms_norm(m)]
    for name, norm in targets:
        if isinstance(norm, nn.LayerNorm) and norm.weight is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PerturbedNorm(norm, name, ctx))
        params[f"{name}.base.weight"] = norm.weight
        if getattr(norm, "bias", None) is not None:
            params[f"{name}.base.bias"] = norm.bias
    return params


def perturb_bias(ctx: VectorPerturbation, y: torch.Tensor, linear_name: str, linear: nn.Linear) -> torch.Tensor:
    """y ± εz of a wrapped linear layer's bias (no-op without a bias or perturbation)."""
    if not ctx.active or linear.bias is None:
        return y
    return ctx.add(y, ctx.z(f"{linear_name}.base.bias", linear.out_features, y.device))


def unsupported_vectors(model: nn.Module, trained: dict[str, nn.Parameter]) -> list[str]:
    """1-D parameters that stay frozen because no functional perturbation is known for their module."""
    ids = {id(p) for p in trained.values()}
    return [n for n, p in model.named_parameters() if len(getattr(p, "ds_shape", p.shape)) == 1 and id(p) not in ids]


class VectorEstimate:
    """ĝ = Σ_d g_d z_d on this rank's shards of the 1-D tensors, and its SGD update -- with LOZO-M's
    momentum (N ← β N + (1-β) ĝ; θ ← θ - η N) when beta > 0, the same rule as in the small space."""

    def __init__(self, shards: dict, beta: float = 0.0) -> None:
        self.shards, self.beta = shards, beta
        self.estimate = {n: torch.zeros_like(s.local) for n, s in shards.items()}
        self.buf: dict[str, torch.Tensor] = {}

    def accumulate(self, dseed: int, coeff: float) -> None:
        for name, s in self.shards.items():
            z = gaussian(dseed, s.key, s.start, s.end, dtype=s.local.dtype, device=s.local.device)
            self.estimate[name].add_(z, alpha=coeff)

    def apply(self, lr: float) -> None:
        for name, s in self.shards.items():
            step = self.estimate[name]
            if self.beta > 0:
                buf = self.buf.get(name)
                step = self.buf[name] = (step.clone().mul_(1 - self.beta) if buf is None
                                         else buf.mul_(self.beta).add_(step, alpha=1 - self.beta))
            s.local.add_(step, alpha=-lr)
        self.discard()

    def discard(self) -> None:
        for e in self.estimate.values():
            e.zero_()

    def state_shards(self) -> dict:
        from dszo.methods.base import Shard

        return {f"{n}::momentum": Shard(f"{n}::momentum", s.key, s.shape, s.start, s.end, self.buf[n])
                for n, s in self.shards.items() if n in self.buf}

    def load_state(self, reader) -> None:
        for n, s in self.shards.items():
            if f"{n}::momentum" in reader.names():
                self.buf[n] = reader.read(f"{n}::momentum", s.start, s.end).to(s.local)
