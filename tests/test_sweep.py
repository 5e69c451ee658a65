"""Sweeps (dszo/sweep.py): spec checking, the points, resumability, and a real two-point sweep of tiny runs."""
import csv
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from dszo import sweep
from dszo.config import ConfigError, parse_overrides
from tests.conftest import REPO, rank_env, tiny_config


def _spec(tmp_path, tiny_model, tiny_data, **spec) -> str:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(tiny_model, tiny_data, tmp_path / "unused", max_steps=2,
                                               eval_before_training=False)))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": str(base), "output_dir": str(tmp_path / "sweep"), **spec}))
    return str(path)


def test_grid_times_seeds_then_points_each_in_its_own_folder(tmp_path, tiny_model, tiny_data):
    spec = sweep.load_spec(_spec(tmp_path, tiny_model, tiny_data, grid={"learning_rate": [1e-3, 1e-2],
                                 "method.zo_eps": [1e-3]}, points=[{"method.rank": 1}], seeds=[1, 2]))
    points = sweep.expand(spec)
    assert [p.name for p in points] == [
        "learning_rate=0.001,method.zo_eps=0.001,seed=1", "learning_rate=0.001,method.zo_eps=0.001,seed=2",
        "learning_rate=0.01,method.zo_eps=0.001,seed=1", "learning_rate=0.01,method.zo_eps=0.001,seed=2",
        "method.rank=1,seed=1", "method.rank=1,seed=2"]
    assert len({p.out for p in points}) == 6 and all(sweep.state(p) == "pending" for p in points)


def test_a_long_point_name_becomes_a_short_distinct_folder(tmp_path, tiny_model, tiny_data):
    """A long swept list (every block's module name) once made a folder name the file system refused."""
    names = [[f"layers.{i}.mlp.down_proj" for i in range(k, k + 10)] for k in (0, 1)]
    spec = sweep.load_spec(_spec(tmp_path, tiny_model, tiny_data, grid={"method.target_modules": names}))
    points = sweep.expand(spec)
    assert all(len(p.out.name) <= sweep.MAX_NAME for p in points) and len({p.out for p in points}) == 2
    for p in points:
        p.out.mkdir(parents=True)


@pytest.mark.parametrize("bad,message", [({"grid": {"learnin_rate": [1]}}, "learnin_rate"),
                                         ({"grid": {"learning_rate": []}}, "non-empty list"),
                                         ({"overrides": {"method.rnak": 2}}, "rnak"),
                                         ({"gird": {}}, "unknown key")])
def test_a_bad_spec_is_refused_before_anything_runs(tmp_path, tiny_model, tiny_data, bad, message):
    with pytest.raises(ConfigError, match=message):
        sweep.load_spec(_spec(tmp_path, tiny_model, tiny_data, **bad))


def test_an_interrupted_point_resumes_from_its_checkpoint_and_a_fresh_one_overwrites(tmp_path, tiny_model,
                                                                                    tiny_data):
    spec = sweep.load_spec(_spec(tmp_path, tiny_model, tiny_data, grid={"learning_rate": [1e-3]}))
    p = sweep.expand(spec)[0]
    assert "--overwrite_output_dir" in sweep.command(spec, p)
    p.out.mkdir(parents=True)
    (p.out / "config.yaml").write_text("{}")
    (p.out / "latest").write_text("checkpoint-1")
    assert sweep.state(p) == "interrupted"
    cmd = sweep.command(spec, p)
    assert cmd[cmd.index("--resume_from_checkpoint") + 1] == "latest" and "--overwrite_output_dir" not in cmd


def test_a_launcher_comes_from_the_interpreters_environment(tmp_path, tiny_model, tiny_data, monkeypatch):
    """`.venv/bin/python -m dszo sweep` with `launcher: deepspeed ...` runs the virtualenv's deepspeed, on PATH or
    not (a chain of studies started without activating the virtualenv failed with FileNotFoundError)."""
    from pathlib import Path

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    spec = sweep.load_spec(_spec(tmp_path, tiny_model, tiny_data, launcher="deepspeed --num_gpus 2"))
    cmd = sweep.command(spec, sweep.expand(spec)[0])
    assert cmd[:3] == [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"]
    assert cmd[3] == "dszo/train.py"
    spec = sweep.load_spec(_spec(tmp_path, tiny_model, tiny_data, launcher="bash launch/sim_cluster.sh 2 1"))
    assert sweep.command(spec, sweep.expand(spec)[0])[:2] == ["bash", "launch/sim_cluster.sh"]   # not ours


def test_a_sweep_runs_every_point_once_and_summarises(tmp_path, tiny_model, tiny_data):
    path = _spec(tmp_path, tiny_model, tiny_data, grid={"learning_rate": [1e-3, 1e-2]}, seeds=[3],
                 overrides={"test_eval_steps": 1})
    cmd = [sys.executable, "-m", "dszo", "sweep", path]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=rank_env(), timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert first.stdout.count("done in") == 2
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=rank_env(), timeout=300)
    assert again.returncode == 0 and "done in" not in again.stdout, again.stdout  # nothing runs twice
    out = tmp_path / "sweep"
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["learning_rate"] for r in rows] == ["0.001", "0.01"] and {r["state"] for r in rows} == {"done"}
    summary = json.loads((out / "summary.json").read_text())["rows"]
    # 2 steps x 8 examples x 2 forwards (ZO-Act), the dev curve ends at the final evaluation
    assert [r["example_forwards"] for r in summary] == [32, 32]
    assert all(0 <= r["dev_accuracy_after"] <= 1 and r["dev_curve"][-1][0] == 32 for r in summary)
    assert all(r["dev_loss_curve"][-1] == [32, r["dev_loss_after"]] for r in summary)
    # test_eval_steps: 1 -> the test split after step 1 and at the end, each beside its majority-class rate
    assert all([x for x, _ in r["test_curve"]] == [16, 32] and 0.5 <= r["test_majority_rate"] <= 1 for r in summary)
    assert (out / "summary.png").stat().st_size > 0
    # a fresh machine: the run folders are gone, a kept copy of the summary is not -- nothing runs again, the
    # finished points keep their rows; without --kept the same sweep would start over
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "summary.json").write_text((out / "summary.json").read_text())
    shutil.rmtree(out)
    listing = subprocess.run(cmd + ["--list", "--kept", str(kept)], capture_output=True, text=True, cwd=REPO,
                             env=rank_env(), timeout=120)
    assert listing.stdout.count("done (kept)") == 2, listing.stdout
    fresh = subprocess.run(cmd + ["--kept", str(kept)], capture_output=True, text=True, cwd=REPO, env=rank_env(),
                           timeout=300)
    assert fresh.returncode == 0 and "done in" not in fresh.stdout, fresh.stdout + fresh.stderr
    assert [{k: v for k, v in r.items() if k != "point"} for r in json.loads((out / "summary.json").read_text())["rows"]] \
        == [{k: v for k, v in r.items() if k != "point"} for r in summary]


def test_a_failing_point_is_recorded_and_the_sweep_exits_non_zero(tmp_path, tiny_model, tiny_data):
    path = _spec(tmp_path, tiny_model, tiny_data, grid={"model.name_or_path": [str(tmp_path / "no_model")]})
    res = subprocess.run([sys.executable, "-m", "dszo", "sweep", path], capture_output=True, text=True, cwd=REPO,
                         env=rank_env(), timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    failed = next((tmp_path / "sweep").glob("*/failed.json"))
    assert json.loads(failed.read_text())["exit_code"] != 0
    listing = subprocess.run([sys.executable, "-m", "dszo", "sweep", path, "--list"], capture_output=True,
                             text=True, cwd=REPO, env=rank_env(), timeout=120)
    assert "failed" in listing.stdout


def test_a_point_stopped_by_a_signal_stops_the_sweep_and_resumes_later(tmp_path, tiny_model, tiny_data):
    """A run that exits 143 (a signal, after saving a checkpoint) is neither failed nor done: the sweep stops with
    143, and the next invocation resumes the point from its checkpoint. The launcher here stands in for a run
    that was stopped (it exits 143 at once)."""
    path = _spec(tmp_path, tiny_model, tiny_data, grid={"learning_rate": [1e-3]}, launcher="bash -c 'exit 143' sh")
    assert sweep.main(path, None, False, False) == 143
    spec = sweep.load_spec(path)
    p = sweep.expand(spec)[0]
    assert not (p.out / "failed.json").exists()
    (p.out / "config.yaml").write_text("{}")   # what the stopped run had written, and its checkpoint pointer
    (p.out / "latest").write_text("checkpoint-1")
    cmd = sweep.command(spec, p)
    assert cmd[cmd.index("--resume_from_checkpoint") + 1] == "latest"


def test_the_summary_takes_list_valued_keys(tmp_path, tiny_model, tiny_data):
    """A swept list (method.target_modules) is a column of the table (its JSON text) and a point of the plot."""
    from dszo.sweep_report import write_summary

    spec = sweep.load_spec(_spec(tmp_path, tiny_model, tiny_data, grid={"method.target_modules": [["q_proj"], ["v_proj", "o_proj"]],
                                                                        "learning_rate": [1e-3, 1e-2]}))
    rows = [{"point": p.index, "name": p.name, **p.overrides, "state": "done", "dev_accuracy_after": 0.5 + p.index / 10,
             "dev_curve": [[16, 0.5]]} for p in sweep.expand(spec)]
    write_summary(spec, rows)
    table = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert sorted(r["method.target_modules"] for r in table) == ['["q_proj"]', '["q_proj"]', '["v_proj", "o_proj"]',
                                                                 '["v_proj", "o_proj"]']
    assert (tmp_path / "sweep" / "summary.png").stat().st_size > 0


def test_every_override_value_reaches_the_run_unchanged():
    """Each value goes on the command line as one word that the run's parser reads back as the same value."""
    data = {"template": "Question: {question}\nType of answer:", "candidates": [" a: b", " c"], "labels": ["y", "n"]}
    rest = {"learning_rate": 3e-3, "disable_tqdm": True, "output_dir": "runs/x", "note": "1e-3", "empty": "",
            "odd": "{x"}
    overrides = {**{f"data.{k}": v for k, v in data.items()}, "method.target_modules": ["down_proj"], **rest}
    assert parse_overrides(sweep._args(overrides)) == {"data": data, "method": {"target_modules": ["down_proj"]},
                                                      **rest}


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_sweep_spec_expands_into_valid_configs(path, monkeypatch):
    """A committed spec that fails only when its turn comes, hours into a chain of studies, costs those hours."""
    monkeypatch.chdir(REPO)
    spec = sweep.load_spec(path)
    for point in sweep.expand(spec):
        sweep._config(spec.config, {**spec.overrides, **point.overrides})


@pytest.mark.parametrize("method,directions,per_example", [("zo_act", 1, 2), ("mezo", 3, 6), ("agzo", 1, 2),
                                                           ("agzo", 3, 4), ("first_order", 1, 3)])
def test_example_forwards_per_step_counts_what_the_method_runs(method, directions, per_example):
    """± eps per direction; AGZO measures one f0 a step and then f+ per direction (1 + D, not 2 D)."""
    cfg = sweep._config(str(REPO / f"configs/rotten_tomatoes_{method}.yaml"),
                        {"method.num_directions": directions, "per_device_train_batch_size": 4,
                         "gradient_accumulation_steps": 2})
    assert sweep.example_forwards_per_step(cfg, world_size=3) == 4 * 2 * 3 * per_example
