"""launch/local.sh: syntax, the command it runs, and its errors (the real runs go through tests/conftest.launch)."""
from __future__ import annotations

import os
import subprocess

from conftest import REPO


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
