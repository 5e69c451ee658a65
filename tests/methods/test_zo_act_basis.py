"""ZO-Act's activation basis: it spans the inputs' subspace, and matches the exact top eigenvectors."""
import torch
from torch import nn

from dszo.config import TrainConfig
from dszo.methods.zo_act import ZOAct
from methods.local_runtime import LocalRuntime


class Inputs:
    """A calibration batch of raw layer inputs [b, s, n] (every token real)."""

    def __init__(self, x):
        self.x = x

    def token_mask(self):
        return torch.ones(self.x.shape[:2], dtype=torch.bool)


def _zo_act(model, rank, **method):
    cfg = TrainConfig()
    cfg.method.rank = rank
    for k, v in method.items():
        setattr(cfg.method, k, v)
    m = ZOAct(cfg, run_seed=0)
    m.attach(model)
    return m


def projector(v):
    q, _ = torch.linalg.qr(v.double())
    return q @ q.T


def test_basis_spans_the_input_subspace():
    torch.manual_seed(0)
    n, r = 48, 3
    u, _ = torch.linalg.qr(torch.randn(n, r))
    batches = [Inputs((torch.randn(4, 10, r) * torch.tensor([5.0, 2.0, 1.0])) @ u.T) for _ in range(3)]
    model = nn.Sequential(nn.Linear(n, 16))
    m = _zo_act(model, rank=r, basis_power_iters=0, basis_scale="orthonormal")
    m.setup(LocalRuntime(model), batches)
    v = model[0].zo_V.detach()
    torch.testing.assert_close(projector(v), projector(u).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(r), atol=1e-5, rtol=0)  # orthonormal columns


def test_basis_matches_exact_eigenvectors_and_unit_rms_scale():
    torch.manual_seed(1)
    n, r = 40, 2
    scales = torch.logspace(1, -2, n)  # a decaying spectrum, as activations have (top-1 dominates)
    mix_ = torch.linalg.qr(torch.randn(n, n))[0]
    batches = [Inputs((torch.randn(8, 12, n) * scales) @ mix_.T) for _ in range(4)]
    model = nn.Sequential(nn.Linear(n, 8))
    m = _zo_act(model, rank=r, basis_power_iters=2, basis_scale="unit_rms")
    m.setup(LocalRuntime(model), batches)
    h = torch.cat([b.x.reshape(-1, n) for b in batches]).double()
    evals, evecs = torch.linalg.eigh(h.T @ h)
    top = evecs[:, -r:].flip(1)
    top = top * torch.sign(top[top.abs().argmax(0), torch.arange(r)])  # canonical signs
    expected = top / (evals[-r:].flip(0) / h.shape[0]).sqrt()
    torch.testing.assert_close(model[0].zo_V.detach().double(), expected, rtol=1e-4, atol=1e-6)
    # unit_rms: the projections have unit mean square over the calibration tokens
    proj = h @ model[0].zo_V.detach().double()
    torch.testing.assert_close(proj.pow(2).mean(0), torch.ones(r, dtype=torch.float64), rtol=1e-4, atol=0)


def test_target_modules_selection_and_error():
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4), "mlp": nn.Linear(4, 4)})
    m = _zo_act(model, rank=1, target_modules=["q_proj", "v_proj"])
    assert sorted(m.adapters) == ["q_proj", "v_proj"]
    import pytest

    with pytest.raises(ValueError, match=r"matched no linear layer; available: mlp, q_proj, v_proj"):
        _zo_act(nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4), "mlp": nn.Linear(4, 4)}),
                rank=1, target_modules=["o_proj"])
