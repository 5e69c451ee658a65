"""The first-order reference on a real ZeRO-3 training engine (gloo ranks): I1 (1 rank = 2 ranks) and
I2 (= plain-PyTorch backprop of the same parameterisation, tests/reference.py), for ZO-Act's coefficients
and for full parameters, both with SGD + momentum: Adam divides each element by its own gradient, so
elements whose gradient is within rounding of 0 step by ±lr either way and no useful bound survives several
steps (tests/tolerances.py); its use in the first-order path is covered by tests/test_quantization.py."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import OTHER_KERNELS, launch, read_metrics, step_records, tiny_config
from compare import basis_bound
from tolerances import TINY_BACKWARD_REL, assert_meaningful, first_order_bounds

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

GLOBAL_BATCH, STEPS = 8, 4
VARIANTS = {
    "zo_act": ({"name": "first_order", "parameterization": "zo_act", "rank": 2, "num_calibration": 16,
                "calibration_batch_size": 4, "basis_oversample": 64, "basis_scale": "orthonormal"}, {"optim": "momentum", "momentum": 0.9, "learning_rate": 0.5}),
    "full": ({"name": "first_order", "parameterization": "full", "trainable": ["*layers.1.*", "model.norm.weight"]},
             {"optim": "momentum", "momentum": 0.9, "learning_rate": 5e-2}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def fo_runs(request, tiny_model, tiny_data, tmp_path_factory):
    method, over = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(f"fo_{request.param}")
    for n in (1, 2):  # the 2-rank run on the scalar kernels: I1 also compares two kinds of CPU kernels
        cfg = tiny_config(tiny_model, tiny_data, root / f"r{n}", max_steps=STEPS,
                          per_device_train_batch_size=GLOBAL_BATCH // n, **over)
        cfg["method"] = dict(method)
        launch(cfg, n, env=OTHER_KERNELS if n == 2 else None)
    return request.param, root


def _result(run, variant):
    return load_file(str(run / ("adapter.safetensors" if variant == "zo_act" else "trainable.safetensors")))


def _reference_trajectory(tiny_model, cfg, variant, run):
    """Plain-PyTorch backprop of the same parameterisation (ZO-Act's B on `run`'s own bases), step by step:
    losses, gradients and parameters, and the bounds derived from them (tests/tolerances.py)."""
    from reference import ReferenceFirstOrderFull, ReferenceFirstOrderZOAct

    m = cfg["method"]
    if variant == "zo_act":
        ref = ReferenceFirstOrderZOAct(tiny_model, cfg["data"], rank=m["rank"], seed=cfg["seed"], eps=0.0,
                                       lr=cfg["learning_rate"])
        ref.opt = torch.optim.SGD(list(ref.B.values()), lr=cfg["learning_rate"], momentum=cfg["momentum"])
        run_v = _result(run, variant)
        ref.V = {n: run_v[f"{n}.zo_V"] for n in ref.layers}
        params = {f"{n}.zo_B": b for n, b in ref.B.items()}
    else:
        ref = ReferenceFirstOrderFull(tiny_model, cfg["data"], seed=cfg["seed"], lr=cfg["learning_rate"],
                                      momentum=cfg["momentum"], patterns=m["trainable"])
        params = dict(ref.params)
    start = {n: p.detach().clone() for n, p in params.items()}
    steps = []
    for t in range(STEPS):
        loss = ref.step(t, GLOBAL_BATCH)["loss"]
        steps.append({"loss": loss, "grads": {n: p.grad.detach().clone() for n, p in params.items()},
                      "params": {n: p.detach().clone() for n, p in params.items()}})
    bounds = first_order_bounds(steps, start, cfg["learning_rate"], cfg["momentum"], TINY_BACKWARD_REL)
    assert_meaningful(bounds[-1]["param"], _norm({n: steps[-1]["params"][n] - start[n] for n in start}), "‖Δθ‖")
    return steps, bounds, start


@pytest.fixture(scope="module")
def fo_reference(fo_runs, tiny_model):
    """The reference trajectory for each run: ZO-Act's on that run's own bases, the full variant's once."""
    variant, root = fo_runs
    cfg = yaml.safe_load((root / "r1.yaml").read_text())
    one = _reference_trajectory(tiny_model, cfg, variant, root / "r1")
    return {"r1": one, "r2": _reference_trajectory(tiny_model, cfg, variant, root / "r2") if variant == "zo_act" else one}


def _norm(tensors: dict) -> float:
    return float(sum((t.double() ** 2).sum() for t in tensors.values()).sqrt())


def _assert_run_within(run, variant, steps, bounds):
    records = step_records(run)
    assert len(records) == STEPS
    for t, rec in enumerate(records):
        assert abs(rec["loss"] - steps[t]["loss"]) <= bounds[t]["loss"], f"step {t}"
    trained = _result(run, variant)
    diff = _norm({n: trained[n].double() - want.double() for n, want in steps[-1]["params"].items()})
    assert diff <= bounds[-1]["param"], f"‖Δθ‖ {diff:.2e} > {bounds[-1]['param']:.2e}"


def test_I1_one_rank_equals_two_ranks(fo_runs, fo_reference, zo_act_spectrum):
    """The full variant: each run within the bound of the reference, so the two within twice it. ZO-Act's runs
    have their own bases: those within twice their Davis–Kahan bound, step 0 (B = 0: basis-independent)
    directly, and each run held to the reference on its own basis (test_I2)."""
    variant, root = fo_runs
    a, b = _result(root / "r1", variant), _result(root / "r2", variant)
    assert a.keys() == b.keys() and a
    steps, bounds, _ = fo_reference["r1"]
    pairs = list(zip(step_records(root / "r1"), step_records(root / "r2"), range(STEPS)))
    if variant == "zo_act":
        for name in zo_act_spectrum["gap_rel"]:
            allowed = basis_bound(zo_act_spectrum, name)
            torch.testing.assert_close(a[f"{name}.zo_V"], b[f"{name}.zo_V"], rtol=0, atol=allowed)
        x, y, _ = pairs[0]
        assert abs(x["loss"] - y["loss"]) <= bounds[0]["loss"]
        return
    for x, y, t in pairs:
        assert abs(x["loss"] - y["loss"]) <= 2 * bounds[t]["loss"]
    assert _norm({k: a[k] - b[k] for k in steps[-1]["params"]}) <= 2 * bounds[-1]["param"]


def test_I2_equals_plain_pytorch_backprop(fo_runs, fo_reference, zo_act_spectrum):
    variant, root = fo_runs
    for run in ("r1", "r2"):  # r2: 2 ranks on the scalar kernels
        steps, bounds, _ = fo_reference[run]
        _assert_run_within(root / run, variant, steps, bounds)
    evals = [r["eval_loss"] for r in read_metrics(root / "r2") if r.get("event") == "eval"]
    assert evals[-1] < evals[0] - 0.01          # backprop lowers the held-out loss within STEPS steps
    if variant == "zo_act":  # the bases themselves against the exact eigendecomposition (Davis–Kahan)
        trained = _result(root / "r2", variant)
        for name, v in zo_act_spectrum["V"].items():
            allowed = basis_bound(zo_act_spectrum, name)
            torch.testing.assert_close(trained[f"{name}.zo_V"], v, rtol=0, atol=allowed)
