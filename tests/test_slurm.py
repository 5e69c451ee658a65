"""The Slurm recipes: valid bash, and in dry-run mode (DRY_RUN=1, a fake node list, no Slurm here) the
commands they would run: one launcher per node with the job's hostfile, --no_ssh and its node rank."""
import os
import subprocess

import pytest

from conftest import REPO

SCRIPTS = ["slurm/dszo.sbatch", "slurm/dszo_torchrun.sbatch", "slurm/sweep.sh", "slurm/common.sh",
           "slurm/sweep_array.sbatch"]


def _run(script, tmp_path, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update({"DRY_RUN": "1", "RUN_DIR": str(tmp_path / "run"), "PATH": "/usr/bin:/bin", **env})
    proc = subprocess.run(["bash", script], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0


def test_deepspeed_recipe_dry_run(tmp_path):
    lines = _run("slurm/dszo.sbatch", tmp_path, SLURM_JOB_NODELIST="gpu[07-08],cpu3", GPUS_PER_NODE="4",
                 CONFIG="configs/rotten_tomatoes_lozo.yaml", EXTRA_ARGS="--max_steps 10")
    assert len(lines) == 1 and lines[0].startswith("+ srun --nodes 3 --ntasks-per-node 1")
    cmd = lines[0].replace("\\", "")
    for part in ("deepspeed' --hostfile", "--no_ssh --node_rank $SLURM_NODEID", "--num_nodes 3 --num_gpus 4",
                 "--master_addr gpu07", "--config 'configs/rotten_tomatoes_lozo.yaml'", "--max_steps 10"):
        assert part in cmd, (part, cmd)
    assert (tmp_path / "run" / "hostfile").read_text() == "gpu07 slots=4\ngpu08 slots=4\ncpu3 slots=4\n"
    assert (tmp_path / "run" / "submitted_config.yaml").read_text() == (REPO / "configs/rotten_tomatoes_lozo.yaml").read_text()


def test_torchrun_recipe_dry_run(tmp_path):
    cmd = _run("slurm/dszo_torchrun.sbatch", tmp_path, SLURM_JOB_NODELIST="n[1-2]", GPUS_PER_NODE="8")[0]
    cmd = cmd.replace("\\", "")
    assert "torchrun' --nnodes 2 --nproc_per_node 8 --node_rank $SLURM_NODEID --master_addr n1" in cmd


def _nodes(line: str) -> str:
    words = line.split()
    return words[words.index("--nodes") + 1]


def test_sweep_submits_one_job_per_node_count(tmp_path):
    lines = _run("slurm/sweep.sh", tmp_path, SWEEP="s1", NODE_COUNTS="1 2 4 8")
    assert [_nodes(ln) for ln in lines] == ["1", "2", "4", "8"]
    assert all("RUN_DIR=runs/s1/nodes" in ln.replace("\\", "") and ln.endswith("slurm/dszo.sbatch") for ln in lines)


def test_sweep_directions_mode_adds_one_group_per_node(tmp_path):
    """MODES="data directions": at N > 1 nodes also a run with --direction_groups N, in nodes<N>-directions."""
    lines = [ln.replace("\\", "") for ln in _run("slurm/sweep.sh", tmp_path, SWEEP="s", NODE_COUNTS="1 4",
                                                   MODES="data directions", EXTRA_ARGS="--max_steps 300")]
    assert [_nodes(ln) for ln in lines] == ["1", "4", "4"]
    assert ["RUN_DIR=runs/s/nodes4-directions" in ln for ln in lines] == [False, False, True]
    assert "EXTRA_ARGS=--max_steps 300 --direction_groups 4 --partition node sbatch" in lines[2]
    assert "EXTRA_ARGS=--max_steps 300 sbatch" in lines[1]
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    bad = subprocess.run(["bash", "slurm/sweep.sh"], cwd=REPO, env={**e, "DRY_RUN": "1", "MODES": "dirs"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "use data and/or directions" in bad.stderr


def test_sweep_array_task_runs_its_point(tmp_path):
    lines = _run("slurm/sweep_array.sbatch", tmp_path, SPEC="sweeps/probe_zo_act.yaml", SLURM_ARRAY_TASK_ID="3")
    assert lines == [f"+ {REPO}/.venv/bin/python -m dszo sweep sweeps/probe_zo_act.yaml --point 3"], lines


def test_recipe_outside_slurm_says_so(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "slurm/dszo.sbatch"], cwd=REPO, env={**e, "DRY_RUN": "1"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "run this under sbatch" in proc.stderr
