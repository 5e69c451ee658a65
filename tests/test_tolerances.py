"""The rounding model of tests/tolerances.py against the real rounding error of the tiny Llama's fp32 forward:
the same forward in fp64 is exact to ~1e-16, so |fp32 − fp64| is what this machine's kernels lose. Any two fp32
computations differ by at most the sum of their two errors, which is what the suite's tolerances bound."""
import math

import pytest
import torch

from conftest import _vocab, build_tiny_model
from tolerances import (TINY_FORWARD_REL, U, Trajectory, assert_meaningful, gaussian_max, loss_atol,
                        norm_from_samples, proj_grad_atol)


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("tol_model"))
    torch.manual_seed(0)
    ids = torch.randint(4, len(_vocab()), (16, 12))
    labels = torch.randint(0, 2, (16,))
    out = {}
    for dtype in (torch.float32, torch.float64):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, 2:4]
        out[dtype] = (logits, torch.nn.functional.cross_entropy(logits, labels))
    return out


def test_fp32_forward_error_is_within_the_model(losses):
    (l32, ce32), (l64, ce64) = losses[torch.float32], losses[torch.float64]
    logit_err = float((l32.double() - l64).abs().max())
    assert float(l64.abs().max()) <= 1.0  # loss_atol assumes the tiny models' logits are at most 1 in magnitude
    assert 0 < logit_err <= TINY_FORWARD_REL
    assert abs(float(ce32) - float(ce64)) <= loss_atol(float(ce64))


def test_bound_is_not_vacuous():
    """The bound stays far below the effects the tests look for (a wrong batch, sign or step moves a loss by
    > 1e-3 on the tiny model): a model so loose that it accepted them would make I1/I2 untestable."""
    assert TINY_FORWARD_REL < 2e-5
    assert loss_atol(0.7) < 1e-3 * 0.7


def test_trajectory_grows_with_the_steps_and_adam_saturates():
    recs = [{"loss_plus": 0.70, "loss_minus": 0.69, "proj_grad": 0.5}] * 3
    sgd = Trajectory(recs, eps=1e-2, lr=1e-2, update="sgd", n=100, z_max=gaussian_max(100))
    assert sgd.loss(0) == 2 * loss_atol(0.70) and sgd.proj_grad(0) == proj_grad_atol(2 * loss_atol(0.70), 1e-2)
    assert sgd.loss(0) < sgd.loss(1) < sgd.loss(2)
    assert sgd.param() == pytest.approx(sum(1e-2 * sgd.proj_grad(t) * gaussian_max(100) + 2 * U for t in range(3)))
    sgd.assert_conditioned()
    assert_meaningful(sgd.param(), moved=3 * 1e-2 * 0.5 * gaussian_max(100))
    with pytest.raises(AssertionError, match="not small"):
        assert_meaningful(sgd.param(), moved=sgd.param())
    momentum = Trajectory(recs, eps=1e-2, lr=1e-2, update="sgd", n=100, z_max=1.0, momentum=0.9)
    assert momentum.param_rms(1.0) == pytest.approx(1e-2 * sum((1 - 0.9 ** (3 - s)) * momentum.proj_grad(s)
                                                               for s in range(3)) + 6 * U)
    adam = Trajectory(recs, eps=1e-2, lr=1e-3, update="adam", n=10)
    # step 0 moves by lr·sign(g·z) only; steps 1, 2 by ≤ 2·lr·δ_t
    assert adam.param() == pytest.approx(2e-3 * (adam.proj_grad(1) + adam.proj_grad(2)) / 0.5 + 6 * U)
    tiny_g = Trajectory([{"loss_plus": 0.7, "loss_minus": 0.7, "proj_grad": 1e-12}] * 3, eps=1e-2, lr=1e-3,
                        update="adam", n=10)
    assert tiny_g.param() == pytest.approx(2 * 2 * 1e-3 + 6 * U)  # |Δ(m̂/√v̂)| ≤ 2 per step, whatever g
    with pytest.raises(AssertionError, match="ill-conditioned"):
        tiny_g.assert_conditioned()


@pytest.mark.parametrize("k", [2, 3, 8])
def test_gradient_norm_bound_holds_at_its_probability(k):
    """norm_from_samples(g) ≥ ‖∇L‖ fails with probability ≤ 1e-3: in 10,000 draws of k g = ∇L·z, at most the
    binomial's mean (10) + 5 standard deviations (√10)."""
    gen = torch.Generator().manual_seed(k)
    grad = torch.randn(50, generator=gen)
    fails = sum(norm_from_samples((torch.randn(k, 50, generator=gen) @ grad).tolist()) < float(grad.norm())
                for _ in range(10_000))
    assert fails <= 10 + 5 * math.sqrt(10)
