"""Comparisons of two runs (or a run and tests/reference.py) under the tolerances of tests/tolerances.py."""
from __future__ import annotations

import torch

from tolerances import Trajectory

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
