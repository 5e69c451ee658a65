"""ZO-Act's activation basis: it spans the inputs' subspace, and matches the exact top eigenvectors."""
import torch
from torch import nn

from dszo.config import TrainConfig
from dszo.methods.zo_act import ZOAct
from methods.local_runtime import LocalRuntime
from tolerances import U, eigvec_atol, reduction_rel


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
    # The fp32 data c·uᵀ is off span(u) by a 3-term reduction's rounding per element, so its Σ = Σ h hᵀ is off by
    # ≤ 2·reduction_rel(3)·tr Σ; the kept eigenvalues' gap to the rest is λ₃ (the rest are ~0); the projectors
    # differ by ≤ 2·sin θ (Davis–Kahan), plus V's cast to fp32.
    h = torch.cat([b.x.reshape(-1, n) for b in batches]).double()
    evals = torch.linalg.eigvalsh(h.T @ h)
    trace_ratio, gap_rel = float(evals.sum() / evals[-1]), float((evals[-r] - evals[-r - 1]) / evals[-1])
    allowed = 2 * eigvec_atol(2 * reduction_rel(3) * trace_ratio, gap_rel) + 2 * U
    torch.testing.assert_close(projector(v), projector(u).double(), atol=allowed, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(r), atol=reduction_rel(n) + 2 * U, rtol=0)  # fp32 VᵀV


def test_basis_matches_exact_eigenvectors_and_unit_rms_scale():
    torch.manual_seed(1)
    n, r = 40, 2
    scales = torch.logspace(1, -2, n)  # a decaying spectrum, as activations have (top-1 dominates)
    mix_ = torch.linalg.qr(torch.randn(n, n))[0]
    batches = [Inputs((torch.randn(8, 12, n) * scales) @ mix_.T) for _ in range(4)]
    model = nn.Sequential(nn.Linear(n, 8))
    # oversample so that the sketch spans all n columns: Rayleigh–Ritz is then exact (in fp64), whatever the
    # spectrum, and what remains is V's cast to fp32; the power iterations still run.
    m = _zo_act(model, rank=r, basis_power_iters=2, basis_scale="unit_rms", basis_oversample=n)
    m.setup(LocalRuntime(model), batches)
    h = torch.cat([b.x.reshape(-1, n) for b in batches]).double()
    evals, evecs = torch.linalg.eigh(h.T @ h)
    top = evecs[:, -r:].flip(1)
    top = top * torch.sign(top[top.abs().argmax(0), torch.arange(r)])  # canonical signs
    expected = top / (evals[-r:].flip(0) / h.shape[0]).sqrt()
    # V's cast to fp32 (relative), and two fp64 eigensolvers of the same Σ: n·u₆₄/gap each
    gap = float(min(evals[-1] - evals[-2], evals[-2] - evals[-3]) / evals[-1])
    fp64 = 2 * n * 2.0 ** -53 / gap * float(expected.abs().max())
    torch.testing.assert_close(model[0].zo_V.detach().double(), expected, rtol=4 * U, atol=fp64)
    # unit_rms: the projections have unit mean square over the calibration tokens (V squared: twice its error)
    proj = h @ model[0].zo_V.detach().double()
    torch.testing.assert_close(proj.pow(2).mean(0), torch.ones(r, dtype=torch.float64), rtol=8 * U, atol=0)


def test_output_rms_scale_gives_the_projections_the_layers_output_mean_square():
    torch.manual_seed(2)
    n, r = 24, 2
    scales = torch.logspace(1, -2, n)
    batches = [Inputs(torch.randn(6, 10, n) * scales) for _ in range(3)]
    model = nn.Sequential(nn.Linear(n, 12))
    with torch.no_grad():
        model[0].weight.mul_(7.0)   # before attach wraps it   # an output scale unlike the input's: the scale must follow W h, not h
    m = _zo_act(model, rank=r, basis_power_iters=2, basis_scale="output_rms", basis_oversample=n)
    m.setup(LocalRuntime(model), batches)
    h = torch.cat([b.x.reshape(-1, n) for b in batches]).double()
    w, bias = model[0].base.weight.detach().double(), model[0].base.bias.detach().double()
    output_ms = float((h @ w.T + bias).square().mean())         # over tokens and output features
    proj = h @ model[0].zo_V.detach().double()
    # fp32 outputs of the layer summed in fp64 (one fp32 rounding each: 2u relative on a square), then V's cast
    torch.testing.assert_close(proj.pow(2).mean(0), torch.full((r,), output_ms, dtype=torch.float64),
                               rtol=8 * U + 2 * reduction_rel(n), atol=0)
    assert abs(output_ms - float(h.square().mean())) > 10 * output_ms * (8 * U)   # the two scales differ here
    # the set-up metric: RMS of the top orthonormal projection over the output's (one layer: min = max)
    top_ms = float(torch.linalg.eigvalsh(h.T @ h)[-1]) / h.shape[0]
    stats = m.setup_metrics()["basis_projection_to_output_rms"]
    assert stats["basis_scale"] == "output_rms" and stats["min"] == stats["max"]
    assert abs(stats["median"] - (top_ms / output_ms) ** 0.5) <= (8 * U + 2 * reduction_rel(n)) * stats["median"]


def test_target_modules_selection_and_error():
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4), "mlp": nn.Linear(4, 4)})
    m = _zo_act(model, rank=1, target_modules=["q_proj", "v_proj"])
    assert sorted(m.adapters) == ["q_proj", "v_proj"]
    import pytest

    with pytest.raises(ValueError, match=r"matched no linear layer; available: mlp, q_proj, v_proj"):
        _zo_act(nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4), "mlp": nn.Linear(4, 4)}),
                rank=1, target_modules=["o_proj"])


def test_layers_to_transform_picks_blocks_counting_from_either_end():
    blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(4, 4), "down": nn.Linear(4, 4)}) for _ in range(5))
    model = nn.ModuleDict({"layers": blocks, "head": nn.Linear(4, 4)})
    m = _zo_act(model, rank=1, target_modules=["down"], layers_to_transform=[0, -2, -1])
    assert sorted(m.adapters) == ["layers.0.down", "layers.3.down", "layers.4.down"]
    import pytest

    with pytest.raises(ValueError, match=r"the model has 5 blocks, so indices run from -5 to 4; \[5\] are outside"):
        _zo_act(nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"down": nn.Linear(4, 4)}) for _ in range(5))}),
                rank=1, target_modules=["down"], layers_to_transform=[1, 5])
