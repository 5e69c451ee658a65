"""Checkpoints, exact resume and faults, on real ranks (deepspeed launcher, gloo, ZeRO-3, the tiny Llama).

- a run stopped by SIGTERM (as Slurm sends it to every task) saves a checkpoint and exits 143; resumed, it ends
  bit-identical to the run that was never interrupted;
- a rank killed with SIGKILL ends the whole job non-zero within a bounded time; the last checkpoint stays
  valid and a relaunch with resume_from_checkpoint: latest finishes bit-identical;
- a 2-rank checkpoint resumed on 1 rank (resharded on load) ends equal within fp32 tolerance;
- the seed-replay log rebuilds the trained tensors bit for bit (also with direction groups and several directions);
- non-finite losses are skipped and counted; max_bad_steps in a row stop the run with a checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compare import assert_steps_close, assert_tensors_close
from conftest import OTHER_KERNELS, REPO, free_port, launch, load_adapter, rank_env, read_metrics, step_records, tiny_config
from tolerances import Trajectory, assert_meaningful

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

STEPS, SAVE = 12, 4


def _cfg(tiny_model, tiny_data, out, ranks=2, **over):
    over = {"max_steps": STEPS, "save_steps": SAVE, "ddp_timeout": 60, "per_device_train_batch_size": 8 // ranks, **over}
    return tiny_config(tiny_model, tiny_data, out, **over)


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_data, tmp_path_factory):
    """The uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("ckpt") / "uninterrupted"
    launch(_cfg(tiny_model, tiny_data, out), 2)
    return out


def _same(a: Path, b: Path):
    """Same kernels, world size and threads as the uninterrupted run: a resumed run is bit-identical (I4)."""
    ta, tb = load_adapter(a), load_adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    la, lb = step_records(a), step_records(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))
    for x, y in zip(la, lb):
        assert x["loss_plus"] == y["loss_plus"]


def _start(cfg: dict, ranks: int = 2) -> tuple[subprocess.Popen, Path]:
    out = Path(cfg["output_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(REPO / "dszo" / "train.py"), "--config", str(path)]
    return subprocess.Popen(cmd, cwd=REPO, env=rank_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True), path


def _wait_for_step(out: Path, step: int, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= step and "event" not in r
                                                    for r in read_metrics(out)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


def _rank_pids(cfg_path: Path) -> dict[int, int]:
    """local rank -> pid of the rank processes (the launcher passes --local_rank=N to each)."""
    out = subprocess.run(["pgrep", "-af", str(cfg_path)], capture_output=True, text=True).stdout.splitlines()
    pids = {}
    for line in out:
        pid, cmd = line.split(" ", 1)
        for tok in cmd.split():
            if tok.startswith("--local_rank="):
                pids[int(tok.split("=")[1])] = int(pid)
    return pids


def _resume(cfg: dict, ranks: int = 2):
    cfg = {**cfg, "resume_from_checkpoint": "latest"}
    return launch(cfg, ranks)


def test_sigterm_saves_and_resume_is_bit_identical(reference, tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tiny_model, tiny_data, tmp_path / "run")
    proc, path = _start(cfg)
    _wait_for_step(tmp_path / "run", 5, proc)
    for pid in _rank_pids(path).values():      # Slurm signals every task of the step
        os.kill(pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, log           # the launcher reports the ranks' exit code 143
    assert "stopped by a signal after step" in log, log[-3000:]
    stopped = (tmp_path / "run" / "latest").read_text().strip()
    assert int(stopped.split("-")[1]) >= 5 and not (tmp_path / "run" / "adapter.safetensors").exists()
    meta = json.loads((tmp_path / "run" / stopped / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["run_seed"] == 7 and meta["versions"]["torch"] == torch.__version__
    resumed = _resume(cfg)
    _same(reference, tmp_path / "run")
    # the summary describes the whole run: its dev evaluation before training comes from the interrupted attempt
    before = [{k: v for k, v in json.loads((d / "results.json").read_text()).items() if k.startswith("dev_")
               and k.endswith("_before")} for d in (reference, tmp_path / "run")]
    assert before[0] and before[0] == before[1]
    # and the last line reads the result beside it
    assert f"before training {before[1]['dev_accuracy_before']:.4f}" in resumed.stdout + resumed.stderr
    replay = (tmp_path / "run" / "replay.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in replay[1:]] == list(range(1, STEPS + 1))


def test_killed_rank_ends_the_job_and_relaunch_finishes(reference, tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tiny_model, tiny_data, tmp_path / "run")
    proc, path = _start(cfg)
    _wait_for_step(tmp_path / "run", SAVE + 2, proc)
    tic = time.time()
    os.kill(_rank_pids(path)[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    elapsed = time.time() - tic
    assert proc.returncode != 0
    # A dead peer is noticed at the latest when the next collective times out (ddp_timeout); then the launcher
    # tears the other ranks down. No machine-speed assumption beyond that.
    limit = cfg["ddp_timeout"] + 30
    assert elapsed < limit, f"the job took {elapsed:.0f} s to exit after a rank died (limit {limit} s)"
    print(f"killed rank -> job exit: {elapsed:.1f} s")
    assert (tmp_path / "run" / "latest").exists()
    _resume(cfg)
    _same(reference, tmp_path / "run")


def _checkpoint_tensors(ckpt: Path, like: dict) -> dict:
    """The full tensors of a checkpoint, from every rank's slices and the [start, end) each file's index gives."""
    from safetensors import safe_open

    out = {k: torch.zeros(t.numel(), dtype=t.dtype) for k, t in like.items()}
    for f in sorted(ckpt.glob("rank*.safetensors")):
        with safe_open(str(f), "pt") as h:
            index = json.loads(h.metadata()["dszo_index"])
            for k in out:
                start, end, _ = index[k]
                end = min(end, out[k].numel())  # the last slice may carry padding
                if end > start:
                    out[k][start:end] = h.get_tensor(k).flatten()[: end - start]
    return out


def test_resume_on_another_world_size(reference, tiny_model, tiny_data, tmp_path):
    """The 2-rank checkpoint at step 8, resharded onto 1 rank (same global batch), one step on: it equals the
    same checkpoint resumed on 2 ranks for that step. One step, because Adam's later steps from a resumed
    state divide by g's of any size: no useful bound survives them (tests/tolerances.py)."""
    import shutil

    last = 2 * SAVE + 1
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        out.mkdir()
        shutil.copytree(reference / f"checkpoint-{2 * SAVE}", out / f"checkpoint-{2 * SAVE}")
        cfg = _cfg(tiny_model, tiny_data, out, ranks=ranks, max_steps=last, save_steps=0,
                   resume_from_checkpoint=str(out / f"checkpoint-{2 * SAVE}"))
        launch(cfg, ranks, env=OTHER_KERNELS if ranks == 1 else None)  # other kernels too
        runs[ranks] = out
    one, two = step_records(runs[1]), step_records(runs[2])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [last]
    assert two[0]["loss_plus"] == next(r for r in step_records(reference) if r["step"] == last)["loss_plus"]
    ta = load_adapter(runs[2])
    tol = Trajectory(two, eps=cfg["method"]["zo_eps"], lr=cfg["learning_rate"], update="adam",
                     n=sum(v.numel() for k, v in ta.items() if k.endswith(".zo_B")), adam_from_start=False)
    tol.assert_conditioned()
    assert_steps_close(two, one, tol)
    at_ckpt = _checkpoint_tensors(reference / f"checkpoint-{2 * SAVE}", ta)
    assert_meaningful(tol.param(), max(float((ta[k].flatten() - at_ckpt[k]).abs().max()) for k in ta if k.endswith(".zo_B")), "B")
    assert_tensors_close(ta, load_adapter(runs[1]), lambda k: 0.0 if k.endswith(".zo_V") else tol.param())  # V is loaded


def test_replay_log_rebuilds_the_trained_tensors(reference):
    lines = (reference / "replay.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + 1 and sum(len(x) + 1 for x in lines[1:]) / STEPS < 120  # bytes per step
    launch({"output_dir": str(reference.parent / "replay_cfg")}, 2, command="replay", with_config=False,
           extra=["--run", str(reference)])

    a, b = load_adapter(reference), load_file(str(reference / "replayed" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_log_of_a_run_with_direction_groups(tiny_model, tiny_data, tmp_path):
    """2 groups x 2 sequential directions: a step logs its 4 g's in the order d·G + k, which replay regenerates."""
    run = tmp_path / "groups"
    cfg = _cfg(tiny_model, tiny_data, run, ranks=1, max_steps=3, save_steps=0, direction_groups=2)
    cfg["method"] = {**cfg.get("method", {}), "num_directions": 2}
    launch(cfg, 1)
    assert all(len(r["proj_grads"]) == 4 for r in step_records(run))
    launch({"output_dir": str(tmp_path / "replay_cfg")}, 1, command="replay", with_config=False, extra=["--run", str(run)])
    a, b = load_adapter(run), load_file(str(run / "replayed" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_model, tiny_data, tmp_path):
    """Adam moves every coordinate by ~lr: lr 1e30 overflows the activations, the losses become NaN."""
    cfg = _cfg(tiny_model, tiny_data, tmp_path / "nan", learning_rate=1e30, max_bad_steps=2, save_steps=0)
    proc = launch(cfg, 2, check=False)
    assert proc.returncode != 0 and "steps in a row had a non-finite loss" in proc.stderr, proc.stderr[-3000:]
    recs = step_records(tmp_path / "nan")
    bad = [r for r in recs if r["skipped"]]
    assert len(bad) == 2 and bad[-1]["skipped_total"] == 2
    assert (tmp_path / "nan" / "latest").exists()


def test_checkpoints_of_earlier_versions_and_of_other_direction_layouts_resume(tmp_path):
    """A checkpoint written before `method.directions` existed resumes (the key's default is what it ran with);
    direction_groups x num_directions may be refactored, but not changed."""
    from dszo.checkpoint import CheckpointError, check_compatible
    from dszo.config import load_config, to_dict

    cfg = to_dict(load_config(None, {"method": {"name": "mezo", "num_directions": 2}}))
    old = {**cfg, "method": {k: v for k, v in cfg["method"].items() if k != "directions"}}
    check_compatible({"config": old, "world_size": 1, "step": 1}, cfg, 1, tmp_path)
    regrouped = {**cfg, "direction_groups": 2, "method": {**cfg["method"], "num_directions": 1}}
    check_compatible({"config": cfg, "world_size": 1, "step": 1}, regrouped, 1, tmp_path)
    with pytest.raises(CheckpointError, match="2 directions a step.*this run has 4"):
        check_compatible({"config": cfg, "world_size": 1, "step": 1}, {**regrouped, "direction_groups": 4}, 1,
                         tmp_path)
