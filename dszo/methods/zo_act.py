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

import time
from typing import Optional

import torch
from torch import nn

from dszo.directions import direction_seed, gaussian, mix, step_seed, tensor_key
from dszo.methods.base import Runtime, StepStats, ZOMethod, register
from dszo.optim import ShardOptimizer
from dszo.subspace import nystrom_basis, orthonormalize, sketch_width

_BASIS_STREAM = 0xBA515


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
    def __init__(self, base: nn.Linear, rank: int, ctx: LayerPerturbation) -> None:
        super().__init__()
        self.base = base
        self.zo_V = nn.Parameter(torch.zeros(base.in_features, rank), requires_grad=False)
        self.zo_B = nn.Parameter(torch.zeros(base.out_features, rank), requires_grad=False)
        object.__setattr__(self, "_ctx", ctx)  # shared state, not a submodule
        self.key_B = 0
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


def select_linear_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if "all-linear" in targets:
        return linears
    chosen = [(n, m) for n, m in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"method.target_modules {targets} matched no linear layer; available: "
                         f"{', '.join(kinds)} (or 'all-linear')")
    return chosen


@register
class ZOAct(ZOMethod):
    name = "zo_act"

    def attach(self, model: nn.Module) -> None:
        self.ctx = LayerPerturbation()
        self.adapters: dict[str, ZOActLinear] = {}
        for name, linear in select_linear_layers(model, self.cfg.method.target_modules):
            parent_name, _, child = name.rpartition(".")
            adapter = ZOActLinear(linear, self.cfg.method.rank, self.ctx)
            adapter.key_B = tensor_key(f"{name}.zo_B")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, adapter)
            self.adapters[name] = adapter

    def trainable(self) -> dict[str, nn.Parameter]:
        return {f"{n}.zo_B": a.zo_B for n, a in self.adapters.items()}

    def extra_state(self) -> dict[str, nn.Parameter]:
        return {f"{n}.zo_V": a.zo_V for n, a in self.adapters.items()}

    def setup(self, rt: Runtime, calibration_batches: list) -> None:
        self.shards = {n: rt.shard(n, p) for n, p in self.trainable().items()}
        self.basis_eigenvalues = self._compute_bases(rt, calibration_batches)
        c = self.cfg
        self.optimizer = ShardOptimizer(c.optim, (c.adam_beta1, c.adam_beta2), c.adam_epsilon, c.momentum,
                                        c.weight_decay)

    def _compute_bases(self, rt: Runtime, batches: list) -> dict[str, torch.Tensor]:
        """V = top-r eigenvectors of Σ h hᵀ over the calibration data of all ranks (subspace iteration)."""
        m = self.cfg.method
        for name, a in self.adapters.items():
            n = a.base.in_features
            k = sketch_width(n, m.rank, m.basis_oversample)
            start = gaussian(mix(self.run_seed, _BASIS_STREAM), tensor_key(f"{name}.zo_V"), 0, n * k)
            a.sketch_q = orthonormalize(start.view(n, k).double())
        evals = {}
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
                    v, evals[name] = nystrom_basis(a.sketch_q, s, m.rank)
                    if m.basis_scale == "unit_rms":  # Vᵀh gets unit mean square over the calibration tokens
                        mean_sq = evals[name] / total_tokens
                        v = v / mean_sq.clamp(min=1e-6 * float(mean_sq[0]) + 1e-30).sqrt()
                    shard = rt.shard(f"{name}.zo_V", a.zo_V)
                    shard.local.copy_(v.reshape(-1)[shard.start:shard.end].to(shard.local.dtype))
                    a.sketch_q = a.sketch_s = None
        return evals

    def step(self, t: int, micro_batches: list, lr: float, rt: Runtime) -> StepStats:
        m = self.cfg.method
        seed, eps, n_dir = step_seed(self.run_seed, t), m.zo_eps, m.num_directions
        estimate = {n: torch.zeros_like(s.local) for n, s in self.shards.items()}
        losses, grads, timings = [], [], {"forward": 0.0, "all_reduce": 0.0, "update": 0.0}
        for d in range(n_dir):
            dseed = direction_seed(seed, d)
            tic = time.perf_counter()
            sums = torch.zeros(3, dtype=torch.float64)
            for batch in micro_batches:
                if m.functional_perturbation:       # one forward over [batch; batch]: L+ and L-
                    self.ctx.perturb(dseed, eps, sign=None)
                    lp, lm, n = rt.loss_sums(batch, doubled=True)
                else:                               # two forwards, +eps then -eps
                    self.ctx.perturb(dseed, eps, sign=+1.0)
                    lp, _, n = rt.loss_sums(batch, doubled=False)
                    self.ctx.perturb(dseed, eps, sign=-1.0)
                    lm, _, _ = rt.loss_sums(batch, doubled=False)
                sums += torch.tensor([lp, lm, n], dtype=torch.float64)
            self.ctx.off()
            toc = time.perf_counter()
            lp, lm, n = rt.all_reduce_sum(sums).tolist()  # the step's only collective: 3 scalars
            g = (lp - lm) / n / (2 * eps)
            tac = time.perf_counter()
            for name, s in self.shards.items():       # each rank: only the slice of Z it owns
                estimate[name].add_(gaussian(dseed, s.key, s.start, s.end, device=s.local.device), alpha=g / n_dir)
            timings["forward"] += toc - tic
            timings["all_reduce"] += tac - toc
            timings["update"] += time.perf_counter() - tac
            losses.append((lp / n, lm / n))
            grads.append(g)
        tic = time.perf_counter()
        self.optimizer.step({name: (s.local, estimate[name]) for name, s in self.shards.items()}, lr)
        timings["update"] += time.perf_counter() - tic
        return StepStats(loss_plus=sum(a for a, _ in losses) / n_dir, loss_minus=sum(b for _, b in losses) / n_dir,
                         proj_grad=grads[0], num_examples=int(n), lr=lr, proj_grads=grads, timings=timings)
