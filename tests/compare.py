"""Comparisons of two runs (or a run and tests/reference.py) under the tolerances of tests/tolerances.py."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from conftest import load_adapter, read_metrics, step_records
from tolerances import TINY_FORWARD_REL, Trajectory, assert_meaningful, basis_atol

LOSSES = ("loss_plus", "loss_minus")


def assert_steps_close(a: list[dict], b: list[dict], tol: Trajectory, keys=LOSSES + ("proj_grad",)) -> None:
    """Step records (or the reference's step results) agree step by step within the trajectory's bounds."""
    assert len(a) == len(b) > 0
    for t, (x, y) in enumerate(zip(a, b)):
        for k in keys:
            allowed = tol.proj_grad(t) if k == "proj_grad" else tol.loss(t)
            assert abs(x[k] - y[k]) <= allowed, f"step {t} {k}: {x[k]!r} vs {y[k]!r}, allowed ±{allowed:.2e}"


def assert_tensors_close(a: dict, b: dict, atol) -> None:
    """Same keys, every element within atol (a float, or a function of the key)."""
    assert a.keys() == b.keys() and a
    for k in a:
        allowed = atol(k) if callable(atol) else atol
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=allowed,
                                   msg=lambda m: f"{k} (allowed ±{allowed:.2e}): {m}")


def assert_tensors_rms_close(a: dict, b: dict, rms) -> None:
    """Same keys; for every tensor, the root-mean-square of the difference within `rms` (a float, or a function
    of the key): a normwise bound."""
    assert a.keys() == b.keys() and a
    for k in a:
        allowed = rms(k) if callable(rms) else rms
        diff = float((a[k].double() - b[k].double()).pow(2).mean().sqrt())
        assert diff <= allowed, f"{k}: rms difference {diff:.2e}, allowed {allowed:.2e}"


# --- ZO-Act runs -----------------------------------------------------------------------------------------------

def run_config(run: Path) -> dict:
    """The config a test launched `run` with (conftest.launch writes it next to the output folder)."""
    return yaml.safe_load((run.parent / f"{run.name}.yaml").read_text())


def quantization_config(kind: str | None):
    """The plain-transformers BitsAndBytesConfig of dszo's `model.quantization` (None for an fp32 base)."""
    if kind in (None, "none"):
        return None
    from transformers import BitsAndBytesConfig

    return (BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_quant_storage=torch.float32))


def zo_act_tolerance(run: Path, forward_rel: float = TINY_FORWARD_REL) -> Trajectory:
    """A ZO-Act run (Adam) against another computation of it on the same basis."""
    cfg = run_config(run)
    n = sum(v.numel() for k, v in load_adapter(run).items() if k.endswith(".zo_B"))
    return Trajectory(step_records(run), eps=cfg["method"]["zo_eps"], lr=cfg["learning_rate"], update="adam", n=n,
                      forward_rel=forward_rel)


def basis_bound(spectrum: dict, layer: str, forward_rel: float = TINY_FORWARD_REL) -> float:
    """Two computations of a layer's basis vectors: each within its Davis–Kahan bound of the exact one."""
    return 2 * basis_atol(spectrum["gap_rel"][layer], spectrum["trace_ratio"][layer], forward_rel)


def assert_matches_reference(run: Path, forward_rel: float = TINY_FORWARD_REL) -> None:
    """I2 for a ZO-Act run: tests/reference.py on the run's own basis reproduces every step's L+, L−, g and the
    trained B within the trajectory's bounds (the bases themselves are checked against the exact ones apart)."""
    from reference import ReferenceZOAct

    cfg, trained = run_config(run), load_adapter(run)
    m = cfg["method"]
    ref = ReferenceZOAct(cfg["model"]["name_or_path"], cfg["data"], rank=m["rank"], seed=cfg["seed"],
                         eps=m["zo_eps"], lr=cfg["learning_rate"],
                         quantization=quantization_config(cfg["model"].get("quantization")))
    ref.V = {n: trained[f"{n}.zo_V"] for n in ref.layers}
    tol = zo_act_tolerance(run, forward_rel)
    tol.assert_conditioned()
    records = step_records(run)
    batch = cfg["per_device_train_batch_size"] * read_metrics(run)[0]["world_size"]  # the global batch
    assert_steps_close(records, [ref.step(t, batch) for t in range(len(records))], tol)
    b = {k: v for k, v in trained.items() if k.endswith(".zo_B")}
    assert_meaningful(tol.param(), max(float(v.abs().max()) for v in b.values()), "B")
    assert_tensors_close({f"{n}.zo_B": v.detach() for n, v in ref.B.items()}, b, tol.param())


def assert_same_zo_act_runs(a: Path, b: Path, spectrum: dict, forward_rel: float = TINY_FORWARD_REL) -> None:
    """I1 for two ZO-Act runs that round differently. Their bases differ within twice their Davis–Kahan bound
    (checked here); a bound on B pushed through the training steps from that would leave nothing to test, so step
    0 (B = 0: basis-independent) is compared directly and each run is held to the reference on its own basis.
    Runs with bit-identical bases (same world size and kernels) are compared directly, step by step."""
    ta, tb = load_adapter(a), load_adapter(b)
    assert ta.keys() == tb.keys() and any(k.endswith(".zo_B") for k in ta)
    bases = [k for k in ta if k.endswith(".zo_V")]
    if all(torch.equal(ta[k], tb[k]) for k in bases):  # one basis: the trajectories compare directly
        tol = zo_act_tolerance(a, forward_rel)
        tol.assert_conditioned()
        assert_steps_close(step_records(a), step_records(b), tol)
        bs = lambda t: {k: v for k, v in t.items() if k.endswith(".zo_B")}  # noqa: E731
        assert_meaningful(tol.param(), max(float(v.abs().max()) for v in bs(ta).values()), "B")
        assert_tensors_close(bs(ta), bs(tb), tol.param())
        return
    for k in bases:
        allowed = basis_bound(spectrum, k.rsplit(".", 1)[0], forward_rel)
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=allowed, msg=lambda m: f"{k}: {m}")
    assert_steps_close(step_records(a)[:1], step_records(b)[:1], zo_act_tolerance(a, forward_rel))
    for run in (a, b):
        assert_matches_reference(run, forward_rel)

