"""Estimator sanity on a problem with a known gradient: one linear layer, squared loss.

The mean of many SPSA estimates approaches the true gradient in the method's parameterisation:
ZO-Act (dense Gaussian on B): E[g Z] = ∇_B L.  LOZO (Z = U Vᵀ, U Gaussian m x r, V fixed between lazy
redraws): E_U[g U Vᵀ] = ∇_W L V Vᵀ, the gradient seen through span(V). With N estimates the relative error
of the mean is about sqrt(d / N) (d = the dimension the direction lives in), and the tolerance is 3x that.
"""
import math

import pytest

import torch
from torch import nn

from dszo.config import TrainConfig, method_config_class
from dszo.directions import direction_seed, gaussian, step_seed
from dszo.methods import get_method
from methods.local_runtime import LocalRuntime
from tolerances import U, reduction_rel


class Rows:
    def __init__(self, x, target):
        self.x, self.target = x, target
        self.labels = torch.zeros(x.shape[0])
        self.valid = torch.ones(x.shape[0], dtype=torch.bool)

    def token_mask(self):
        return torch.ones(self.x.shape[:2], dtype=torch.bool)


class SquaredLossRuntime(LocalRuntime):
    """Single process; loss = ½‖layer(x) - target‖² per row."""

    def loss_sums(self, batch, doubled):
        x = torch.cat([batch.x, batch.x]) if doubled else batch.x
        with torch.no_grad():
            per_row = 0.5 * (self.model(x) - torch.cat([batch.target] * (2 if doubled else 1))).pow(2).sum((1, 2))
        b = batch.x.shape[0]
        return float(per_row[:b].sum()), float(per_row[b:].sum()) if doubled else 0.0, b


def _method(name, model, **opts):
    cfg = TrainConfig(optim="sgd")
    cfg.method = method_config_class(name)(**opts)
    m = get_method(name)(cfg, run_seed=3)
    m.attach(model)
    return m


def _problem(seed=0, n=12, m=6, r_in=3):
    torch.manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, r_in))[0]
    x = torch.randn(16, 5, r_in) @ basis.T            # inputs in an r_in-dimensional subspace
    return x, torch.randn(16, 5, m), basis


def test_zo_act_mean_estimate_approaches_gradient_of_B():
    x, target, _ = _problem()
    model = nn.Sequential(nn.Linear(12, 6, bias=False))
    m = _method("zo_act", model, rank=3, zo_eps=1e-3, basis_power_iters=0, basis_oversample=16)
    rt = SquaredLossRuntime(model)
    batch = Rows(x, target)
    m.setup(rt, [batch])
    layer = model[0]
    b = layer.zo_B.detach().clone().requires_grad_(True)
    out = layer.base(x) + (x @ layer.zo_V) @ b.T
    (0.5 * (out - target).pow(2).sum((1, 2)).mean()).backward()
    true = b.grad
    N, shard = 3000, m.partitions["0.zo_B"]
    mean = torch.zeros_like(true).view(-1)
    for d in range(N):
        dseed = direction_seed(step_seed(0, 0), d)
        a, c, n = m.losses(0, dseed, batch, rt)
        mean += m.projected_gradient(a, c, n) * gaussian(dseed, shard.key, 0, shard.numel) / N
    rel = float((mean.view_as(true) - true).norm() / true.norm())
    assert rel < 3 * math.sqrt(true.numel() / N), rel


def test_lozo_mean_estimate_approaches_gradient_seen_through_fixed_V():
    """With V fixed (lazy), E_U[g U Vᵀ] = ∇_W L · V Vᵀ: the gradient as seen through span(V)."""
    x, target, _ = _problem(1)
    model = nn.Sequential(nn.Linear(12, 6, bias=False))
    w0 = model[0].weight.detach().clone().requires_grad_(True)
    (0.5 * (x @ w0.T - target).pow(2).sum((1, 2)).mean()).backward()
    m = _method("lozo", model, rank=2, zo_eps=1e-3, lazy_interval=10**9)
    rt = SquaredLossRuntime(model)
    batch = Rows(x, target)
    m.setup(rt, [])
    v = m._v(0, "0.base.weight")
    expected = w0.grad @ v @ v.T
    N, mean = 4000, torch.zeros_like(expected)
    for d in range(N):
        dseed = direction_seed(step_seed(0, 0), d)
        a, c, n = m.losses(0, dseed, batch, rt)
        mean += m.projected_gradient(a, c, n) * (m._u_rows(dseed, "0.base.weight", 0, 6) @ v.T) / N
    rel = float((mean - expected).norm() / expected.norm())
    assert rel < 3 * math.sqrt(6 * 2 / N), rel


def test_lozo_v_is_fixed_for_lazy_interval_steps_and_u_is_fresh_each_step():
    model = nn.Sequential(nn.Linear(12, 6, bias=False))
    m = _method("lozo", model, rank=2, lazy_interval=5)
    m.setup(SquaredLossRuntime(model), [])
    name = "0.base.weight"
    vs = [m._v(t, name) for t in range(11)]
    assert all(torch.equal(vs[0], v) for v in vs[1:5])
    assert not torch.equal(vs[4], vs[5]) and torch.equal(vs[5], vs[9]) and not torch.equal(vs[9], vs[10])
    us = [m._u_rows(step_seed(3, t), name, 0, 6) for t in range(3)]
    assert not torch.equal(us[0], us[1]) and not torch.equal(us[1], us[2])
    # U and V come from independent streams: V of step 0 is not U of any step.
    assert not any(torch.equal(u.view(-1)[:4], vs[0].reshape(-1)[:4]) for u in us)


def _projector(a):
    q = torch.linalg.qr(a.double())[0]
    return q @ q.T


def test_agzo_subspace_contains_the_dominant_directions_of_the_activations():
    x, target, basis = _problem(3)
    clean = x.reshape(-1, 12).double()
    x = x + 1e-3 * torch.randn_like(x)                # a dominant 3-dim subspace plus small isotropic noise
    model = nn.Sequential(nn.Linear(12, 6, bias=False))
    m = _method("agzo", model, rank=3, power_iters=3, zo_eps=1e-3)
    rt = SquaredLossRuntime(model)
    m.setup(rt, [])
    m.begin_step(0, [Rows(x, target)], rt)   # f0 captures H, computes A
    a = m.A["0.base.weight"]
    # QR in fp64, cast to fp32 (u per element), then AᵀA in fp32: a 12-term reduction of unit-bounded terms
    torch.testing.assert_close(a.T @ a, torch.eye(3), atol=reduction_rel(12) + 2 * U, rtol=0)
    # Davis–Kahan on the noise's ΔΣ against the clean subspace's smallest eigenvalue (the rest are 0):
    # ‖P_A − P_basis‖_F = √2·‖sin Θ‖_F ≤ √(2·rank)·‖ΔΣ‖/(λ₃ − ‖ΔΣ‖); the power iterations' remaining error,
    # (λ₄/λ₃)^(iters+1) with λ₄ ~ ‖ΔΣ‖, is far smaller.
    noisy = x.reshape(-1, 12).double()
    delta = float(torch.linalg.matrix_norm(noisy.T @ noisy - clean.T @ clean, ord=2))
    lam3 = float(torch.linalg.eigvalsh(clean.T @ clean)[-3])
    assert float((_projector(a) - _projector(basis)).norm()) < math.sqrt(2 * 3) * delta / (lam3 - delta)


def test_lozo_m_carries_momentum_into_the_new_v():
    """On a redraw step, N ← β N V_oldᵀ V_new / n + (1-β) g U (design §1)."""
    x, target, _ = _problem(4)
    model = nn.Sequential(nn.Linear(12, 6, bias=False))
    m = _method("lozo_m", model, rank=2, lazy_interval=2, momentum=0.9, zo_eps=1e-3)
    rt, batch, name = SquaredLossRuntime(model), Rows(x, target), "0.base.weight"
    m.setup(rt, [])
    for t in range(2):
        m.step(t, [batch], 1e-3, rt)
    before, v_old, v_new = m.momentum_buf[name].clone(), m._v(1, name), m._v(2, name)
    w_before = model[0].base.weight.detach().clone()
    g = m.step(2, [batch], 1e-3, rt).proj_grad
    u = m._u_rows(direction_seed(step_seed(3, 2), 0), name, 0, 6)
    expected = 0.9 * before @ (v_old.T @ v_new) / 12 + 0.1 * g * u
    # The same formula in another operation order: products of 12- and 2-term reductions (relative to the
    # magnitudes of the terms), a few roundings more; the weight adds one product and one subtraction.
    scale = float((0.9 * before.abs() @ (v_old.abs().T @ v_new.abs()) / 12 + 0.1 * abs(g) * u.abs()).max())
    allowed = 4 * reduction_rel(12) * scale
    torch.testing.assert_close(m.momentum_buf[name], expected, rtol=0, atol=allowed)
    w_want = w_before - 1e-3 * expected @ v_new.T
    torch.testing.assert_close(model[0].base.weight.detach(), w_want, rtol=0,
                               atol=1e-3 * 2 * (allowed + reduction_rel(2) * scale) * float(v_new.abs().max())
                               + 2 * U * float(w_want.abs().max()))


# lr, optimiser, method options, and the loss ratio to reach in 200 steps on a linear layer + LayerNorm. ZO-Act
# trains only B of the linear layer (not the biases or the LayerNorm), and the best it can reach here is ~0.85
# of the starting loss (it plateaus there at any learning rate); the others train every tensor and reach ~0.5.
SETTINGS = {
    "zo_act": (0.1, "adam", {"rank": 3, "basis_power_iters": 0, "basis_oversample": 16}, 0.9),
    "mezo": (2e-3, "sgd", {}, 0.75),
    "lozo": (5e-3, "sgd", {"rank": 2, "lazy_interval": 20}, 0.75),
    "lozo_m": (5e-3, "sgd", {"rank": 2, "lazy_interval": 20}, 0.75),
    "agzo": (5e-3, "sgd", {"rank": 2}, 0.75),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_method_lowers_the_training_loss(name):
    x, target, _ = _problem(2)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 6, bias=True), nn.LayerNorm(6))
    lr, optim, opts, ratio = SETTINGS[name]
    cfg = TrainConfig(optim=optim, learning_rate=lr)
    cfg.method = method_config_class(name)(zo_eps=1e-3, **opts)
    m = get_method(name)(cfg, run_seed=3)
    m.attach(model)
    rt, batch = SquaredLossRuntime(model), Rows(x, target)
    m.setup(rt, [batch])
    before = rt.loss_sums(batch, False)[0]
    for t in range(200):
        m.step(t, [batch], lr, rt)
    assert rt.loss_sums(batch, False)[0] < ratio * before


@pytest.mark.parametrize("m,n,start,end,rows_per_slice", [(7, 5, 3, 29, 1), (7, 5, 0, 35, 2), (4, 9, 9, 18, 100),
                                                           (6, 4, 5, 6, 1), (300, 64, 1000, 15000, 7)])
def test_low_rank_update_in_row_slices_equals_the_whole_block(monkeypatch, m, n, start, end, rows_per_slice):
    """LOZO's and AGZO's W -= lr U Vᵀ on a rank's flat partition, formed a few rows at a time (partitions that
    start and end mid-row included), equals the update formed from the whole U Vᵀ. Each element is the same
    2-term dot product either way: float64 and a bound of a few ulps of the operands' magnitude."""
    from dszo.methods import estimates
    from dszo.methods.base import Partition

    monkeypatch.setattr(estimates, "UPDATE_SLICE", rows_per_slice * n)
    g = torch.Generator().manual_seed(m * n + start)
    w, u, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((m * n,), (m, 2), (n, 2)))
    expected = w[start:end] - 0.1 * (u @ v.T).reshape(-1)[start:end]
    part = Partition("w", 0, (m, n), start, end, w[start:end].clone())
    r0, r1 = estimates.partition_rows(part)
    estimates.apply_low_rank_rows(part, u[r0:r1], v, 0.1)
    bound = 8 * torch.finfo(torch.float64).eps * (1 + (u.abs() @ v.abs().T).max())
    torch.testing.assert_close(part.local, expected, rtol=0, atol=float(bound))
