"""launch/local.sh: syntax, the command it runs, and its errors (the real runs go through tests/conftest.launch);
launch/sim_cluster.sh: its exit code."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO, run_group
from test_distributed import _can_make_netns


def _run(*args, **env):
    return subprocess.run(["bash", "launch/local.sh", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_syntax():
    assert subprocess.run(["bash", "-n", "launch/local.sh"], cwd=REPO).returncode == 0


def test_dry_run_prints_the_launcher_command():
    cfg = "configs/rotten_tomatoes_zo_act.yaml"
    out = _run("2", cfg, "--max_steps", "5", DRY_RUN="1").stdout.strip()
    assert out.endswith(f"deepspeed --num_gpus 2 {REPO}/dszo/train.py --config {cfg} --max_steps 5")
    out = _run("2", cfg, DRY_RUN="1", LAUNCHER="torchrun").stdout.strip()
    assert "torchrun --nproc_per_node 2" in out


def test_errors_name_the_problem():
    proc = _run("2", "no/such.yaml", DRY_RUN="1")
    assert proc.returncode == 2 and "config not found: no/such.yaml" in proc.stderr
    proc = _run("2", "configs/rotten_tomatoes_zo_act.yaml", DRY_RUN="1", LAUNCHER="srun")
    assert proc.returncode == 2 and "LAUNCHER must be" in proc.stderr
    assert _run().returncode == 2


@pytest.mark.netns
def test_sim_cluster_reports_a_nodes_own_exit_code(tmp_path):
    """A sweep tells a diverged run (3) and a stopped one (143) from a failure by the launcher's exit code: the
    simulated cluster passes a node's on (here 2, a config error on every node) instead of a bare 1."""
    reason = _can_make_netns()
    if reason:
        pytest.skip(f"needs network namespaces: {reason}")
    proc = run_group(["bash", "launch/sim_cluster.sh", "2", "1", "dszo/train.py", "--config",
                      "configs/rotten_tomatoes_zo_act.yaml", "--method.rnak", "4", "--output_dir", str(tmp_path)],
                     timeout=180)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "rnak" in proc.stdout + proc.stderr
