"""Partition optimisers: updating slices independently equals torch.optim on the whole tensor."""
import math

import pytest
import torch

from dszo.optim import PartitionOptimizer, lr_at
from tolerances import U


@pytest.mark.parametrize("kind,wd", [("adam", 0.0), ("adam", 0.1), ("momentum", 0.0), ("sgd", 0.01)])
def test_sharded_update_matches_torch_optim(kind, wd):
    torch.manual_seed(0)
    full = torch.randn(37)
    ref = full.clone().requires_grad_(True)
    if kind == "adam":
        opt = torch.optim.AdamW([ref], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    else:
        opt = torch.optim.SGD([ref], lr=0.05, momentum=0.9 if kind == "momentum" else 0.0, weight_decay=wd)
    mine = full.clone()
    shards = [mine[:20], mine[20:]]  # two "ranks", views into one buffer
    sopt = PartitionOptimizer(kind, betas=(0.9, 0.99), eps=1e-8, momentum=0.9, weight_decay=wd)
    for _ in range(5):
        g = torch.randn(37)
        ref.grad = g.clone()
        opt.step()
        sopt.step({"a": (shards[0], g[:20]), "b": (shards[1], g[20:])}, lr=0.05)
    # Same inputs, other operation order: each step's update rounds ≤ 8 times (moments, sqrt, bias corrections,
    # division, lr, weight decay, subtraction), relative to the parameter's magnitude.
    torch.testing.assert_close(mine, ref.detach(), rtol=0, atol=5 * 8 * U * float(ref.detach().abs().max()))


def test_lr_schedules():
    assert lr_at(0, 1.0, "constant", 0, 10) == 1.0
    assert lr_at(0, 1.0, "linear", 2, 10) == pytest.approx(0.5)   # warm-up
    assert lr_at(1, 1.0, "linear", 2, 10) == pytest.approx(1.0)
    assert lr_at(6, 1.0, "linear", 2, 10) == pytest.approx(0.5)
    assert lr_at(6, 1.0, "cosine", 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, 1.0, "cosine", 0, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("kind,wd", [("adam", 0.1), ("momentum", 0.01), ("sgd", 0.0)])
def test_update_in_slices_equals_the_whole(kind, wd):
    """The fused ZO update walks a partition slice by slice: the same elementwise operations, the same bits
    (slices of 64 elements keep every element in the vectorised loop, as the whole does)."""
    torch.manual_seed(1)
    whole, pieces = torch.randn(256), None
    pieces = whole.clone()
    a = PartitionOptimizer(kind, momentum=0.9, weight_decay=wd)
    b = PartitionOptimizer(kind, momentum=0.9, weight_decay=wd)
    for _ in range(3):
        g = torch.randn(256)
        a.step({"w": (whole, g)}, lr=0.01)
        b.begin_step()
        for lo in range(0, 256, 64):
            b.update("w", pieces[lo:lo + 64], g[lo:lo + 64], 0.01, slice(lo, lo + 64), 256)
    assert torch.equal(whole, pieces)
    assert all(torch.equal(a.state["w"][k], b.state["w"][k]) for k in a.state["w"])
