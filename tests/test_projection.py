"""benchmarks/projection.py: the analytic cluster model's volumes and scaling behaviour."""
from __future__ import annotations

import argparse
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from projection import gather_s, project  # noqa: E402


def _args(**over):
    a = dict(gpus_per_node=8, tflops=1000.0, mfu=0.5, batch=8, seq=256, bytes_per_param=2.0, grad_bytes=2.0,
             intra_bw=300e9, inter_bw=50e9, intra_latency=1e-5, inter_latency=2e-5, zo_step_over_fwd2x=1.0)
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
