"""benchmarks/projection.py: the analytic cluster model's volumes and scaling behaviour."""
from __future__ import annotations

import argparse
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from projection import gather_s, measured_steps, project, serial_fraction, time_to_accuracy  # noqa: E402


def _args(**over):
    a = dict(gpus_per_node=8, tflops=1000.0, mfu=0.5, batch=8, seq=256, bytes_per_param=2.0, grad_bytes=2.0,
             intra_bw=300e9, inter_bw=50e9, intra_latency=1e-5, inter_latency=2e-5, zo_step_over_fwd2x=1.0,
             step_ratios={})
    a.update(over)
    return argparse.Namespace(**a)


def test_ring_gather_time():
    assert gather_s(8e9, 1, 1e9, 1.0) == 0.0
    assert gather_s(8e9, 4, 1e9, 0.5) == pytest.approx(8 * 3 / 4 + 3 * 0.5)


def test_only_scalars_cross_nodes_with_a_node_partition():
    p, a = 7e9, _args()
    one, many = project(p, 1, a), project(p, 64, a)
    assert many["inter_node_bytes_per_gpu_step"]["zo_node"] == 32
    world = 8 * 64
    assert many["inter_node_bytes_per_gpu_step"]["fo"] == pytest.approx((2 * 2 * p + 2 * p) * (world - 1) / world)
    # weak scaling: per-GPU work is fixed, so a node-partitioned ZO step grows only by the scalar all-reduce
    assert many["zo_node_step_s"] - one["zo_node_step_s"] == pytest.approx(2 * 2e-5 * (9 - 3))
    assert many["zo_world_step_s"] > many["zo_node_step_s"]
    # compute: ZO = one forward over the doubled batch (4 P T), first order = 6 P T
    flops = 1000e12 * 0.5
    assert one["zo_node_step_s"] == pytest.approx(4 * p * 8 * 256 / flops + gather_s(2 * p, 8, 300e9, 1e-5)
                                                  + 2 * 3 * 2e-5)
    assert one["mem_gib_per_gpu"]["fo_adam"] == pytest.approx(16 * p / 8 / 2**30)


def test_the_serial_fraction_is_recovered_from_amdahl_shaped_steps():
    for s in (0.0, 0.3, 1.0):
        steps = {n: 400 * (s + (1 - s) / n) for n in (1, 2, 4)}
        assert serial_fraction(steps) == pytest.approx(s, abs=1e-12)
    assert serial_fraction({1: 100, 2: 150, 4: 300}) == 1.0   # slower with more nodes: clamped, no speed-up


def test_time_to_accuracy_by_mode():
    a = _args(rng_rate=1e11)
    steps = {1: 400.0, 2: 200.0, 4: 100.0}            # s = 0: N times the directions, N times fewer steps
    p = 7e9
    base = project(p, 4, a)["zo_node_step_s"]
    zo = time_to_accuracy(p, 4, "zo_act", "directions", steps, a)
    assert zo["steps"] == pytest.approx(100) and zo["time_s"] == pytest.approx(100 * base)
    assert zo["inter_node_bytes_per_step"] == 8 * (3 * 4 + 1)
    mezo = time_to_accuracy(p, 4, "mezo", "directions", steps, a)   # 3 more draws of Z over the GPU's shard
    assert mezo["step_s"] == pytest.approx(base + 3 * p / 8 / 1e11)
    assert time_to_accuracy(p, 4, "mezo", "data", steps, a)["step_s"] == pytest.approx(base)
    assert time_to_accuracy(p, 1, "zo_act", "data", steps, a)["inter_node_bytes_per_step"] == 0
    # a method's own measured step / forward ratio scales its compute, not the other method's
    own = _args(rng_rate=1e11, step_ratios={"mezo": 2.0})
    compute = 4 * p * 8 * 256 / (1000e12 * 0.5)
    assert time_to_accuracy(p, 4, "mezo", "data", steps, own)["step_s"] == pytest.approx(base + compute)
    assert time_to_accuracy(p, 4, "zo_act", "data", steps, own)["step_s"] == pytest.approx(base)


def test_measured_steps_count_a_run_that_never_reached_the_target_as_its_length():
    runs = {"a": {"method": "zo_act", "nodes": 1, "mode": "data", "steps": 300,
                  "steps_to_1node_final": {"dev_loss": 300}},
            "b": {"method": "zo_act", "nodes": 4, "mode": "directions", "steps": 300,
                  "steps_to_1node_final": {"dev_loss": None}}}
    found = measured_steps({"runs": runs})
    assert found[("zo_act", "data")] == {1: 300} and found[("zo_act", "directions")] == {1: 300, 4: 300}
