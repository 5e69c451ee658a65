"""The functional 1-D perturbation (norm scales/shifts, linear biases) equals writing ±εz into the tensor."""
import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from dszo.directions import tensor_key
from dszo.methods.perturbation import DOUBLED, Perturbation
from dszo.methods.vectors import PerturbedNorm, perturb_bias, unsupported_vectors, wrap_norms
from tolerances import U, reduction_rel


def _in_place(module, param, z, eps, x):
    orig = param.detach().clone()
    out = {}
    with torch.no_grad():
        for sign in (+1.0, -1.0):
            param.copy_(orig + sign * eps * z)
            out[sign] = module(x)
        param.copy_(orig)
    return out


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_perturbed_norm_equals_perturbed_scale_and_shift(kind):
    torch.manual_seed(0)
    base = LlamaRMSNorm(16, eps=1e-5) if kind == "rms" else nn.LayerNorm(16)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p))
    root = nn.Sequential(base)
    ctx = Perturbation()
    params = wrap_norms(root, ctx)
    assert set(params) == ({"0.base.weight"} if kind == "rms" else {"0.base.weight", "0.base.bias"})
    x = torch.randn(3, 5, 16)
    ctx.set(seed=7, eps=1e-2, sign=DOUBLED)
    with torch.no_grad():
        doubled = root(torch.cat([x, x]))
    z = {n: ctx.dense(tensor_key(n), 16, "cpu") for n in params}
    ctx.off()
    # the reference: write w ± εz_w (and b ± εz_b) into the plain module
    plain = base
    orig = {n: p.detach().clone() for n, p in params.items()}
    for sign, half in ((+1.0, doubled[:3]), (-1.0, doubled[3:])):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(orig[n] + sign * 1e-2 * z[n])
            want = plain(x)
            for n, p in params.items():
                p.copy_(orig[n])
        # The norm's 16-term reduction on a doubled vs a single batch (kernels may block them differently), then
        # (w ± εz)·n vs w·n ± εz·n: one rounding more
        torch.testing.assert_close(half, want, rtol=0, atol=2 * (reduction_rel(16) + U) * float(want.abs().max()))


def test_bias_perturbation_and_one_sided_sign():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    ctx = Perturbation()
    x = torch.randn(2, 4)
    ctx.set(seed=3, eps=0.5, sign=+1.0)
    y = perturb_bias(ctx, lin(x).detach(), tensor_key("fc.base.bias"), lin)
    z = ctx.dense(tensor_key("fc.base.bias"), 6, "cpu")
    ctx.off()
    torch.testing.assert_close(y, lin(x).detach() + 0.5 * z, rtol=0, atol=0)  # the same two fp32 operations
    assert torch.equal(perturb_bias(ctx, lin(x).detach(), tensor_key("fc.base.bias"), lin), lin(x).detach())  # off: untouched


def test_unsupported_1d_tensors_are_listed():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

    root = nn.Sequential(nn.LayerNorm(4), Scale())
    trained = wrap_norms(root, Perturbation())
    assert unsupported_vectors(root, trained) == ["1.gain"]
    assert isinstance(root[0], PerturbedNorm)
