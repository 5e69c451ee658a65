"""Sweeps: a grid (or a list) of config overrides x seeds, each point one training run in its own folder.

    python -m dszo sweep sweeps/rotten_tomatoes_lr.yaml            # every unfinished point, one after another
    python -m dszo sweep sweeps/rotten_tomatoes_lr.yaml --list     # the points and their state
    python -m dszo sweep sweeps/rotten_tomatoes_lr.yaml --point 3  # only point 3 (a Slurm array task)
    python -m dszo sweep sweeps/rotten_tomatoes_lr.yaml --summary  # only summary.csv / summary.json / plots
    python -m dszo sweep SPEC --kept benchmarks/results/sweeps/NAME   # a fresh machine: keep the finished points
                                                                      # of a committed summary, run the rest

Resumable: a point whose folder holds results.json is done and never runs again; an interrupted point resumes
from its latest checkpoint (set save_steps in `overrides`), or starts over when it has none or its method
cannot resume. A failed point is recorded (failed.json) and retried by the next invocation; the others go on.
A point whose losses stopped being finite (exit 3) is a result: recorded (diverged.json), never rerun.
The spec (YAML) is documented in the README ("Sweeps") and by SweepSpec below.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from dszo.config import ConfigError, load_config, parse_overrides
from dszo.metrics import read_metrics


@dataclasses.dataclass
class SweepSpec:
    config: str                                   # the base training config every point starts from
    output_dir: str                               # points go to <output_dir>/<point name>/
    grid: dict = dataclasses.field(default_factory=dict)      # key -> values: every combination
    points: list = dataclasses.field(default_factory=list)    # explicit override sets (after the grid's)
    seeds: list = dataclasses.field(default_factory=lambda: [42])
    overrides: dict = dataclasses.field(default_factory=dict)  # applied to every point
    launcher: str = "python"                      # python: one process (all cores); or a launcher that runs the
    #                                               training script: "deepspeed --num_gpus 2", "bash launch/sim_cluster.sh 2 1"
    metric: str = "dev_accuracy_after"            # the summary column points are ranked by (higher is better)


@dataclasses.dataclass
class Point:
    index: int
    name: str
    overrides: dict                               # this point's keys (grid/points) and seed, without `overrides`
    out: Path


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep spec {p}: no such file")
    raw = yaml.safe_load(p.read_text()) or {}
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"sweep spec {p}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("config", "output_dir"):
        if key not in raw:
            raise ConfigError(f"sweep spec {p}: `{key}` is required")
    spec = SweepSpec(**raw)
    if not isinstance(spec.grid, dict) or any(not isinstance(v, list) or not v for v in spec.grid.values()):
        raise ConfigError(f"sweep spec {p}: `grid` maps each config key to a non-empty list of values")
    if not isinstance(spec.points, list) or any(not isinstance(x, dict) for x in spec.points):
        raise ConfigError(f"sweep spec {p}: `points` is a list of {{key: value}} override sets")
    for overrides in [spec.overrides, *spec.points, *({k: v[0]} for k, v in spec.grid.items())]:
        _check_keys(spec, overrides, p)
    return spec


def _check_keys(spec: SweepSpec, overrides: dict, where: Path) -> None:
    """Every key must be a config key: load the base config with it (a typo fails now, not after hours)."""
    try:
        _config(spec.config, overrides)
    except ConfigError as e:
        raise ConfigError(f"sweep spec {where}: {e}") from None


def _text(value) -> str:
    """One command-line word that `--key word` reads back as `value` (parse_overrides reads YAML, a superset of
    JSON): lists, mappings and strings YAML would read as something else (a prompt with ': ') go as JSON."""
    if isinstance(value, (list, dict)) or (isinstance(value, str) and _yaml_reads(value) != value):
        return json.dumps(value)
    return str(value)


def _yaml_reads(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k}", _text(v))]


def _config(path: str, overrides: dict):
    return load_config(path, parse_overrides(_args(overrides)))


MAX_NAME = 120  # a point's folder name; a longer one (a long swept list) is cut and ends in a hash of the whole


def _folder_name(text: str) -> str:
    name = re.sub(r"[^\w.=,+\-\[\]]", "", text)
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def expand(spec: SweepSpec) -> list[Point]:
    keys = list(spec.grid)
    sets = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))] if keys else []
    sets += [dict(x) for x in spec.points]
    sets = sets or [{}]
    points = []
    for overrides in sets:
        for seed in spec.seeds:
            values = {**overrides, "seed": seed}
            name = _folder_name(",".join(f"{k}={_text(v)}" for k, v in values.items()))
            points.append(Point(len(points), name, values, Path(spec.output_dir) / name))
    return points


EXIT_DIVERGED = 3  # dszo train's exit code when the losses stopped being finite: a result, not a failure
EXIT_STOPPED = 143  # dszo train stopped by SIGTERM/SIGINT after saving a checkpoint: the sweep stops too


class SweepStopped(RuntimeError):
    """A point was stopped by a signal (a Slurm time limit, Ctrl-C): the sweep ends; rerunning it resumes."""


def state(point: Point) -> str:
    if (point.out / "results.json").exists():
        return "done"
    if (point.out / "diverged.json").exists():
        return "diverged"
    if (point.out / "failed.json").exists():
        return "failed"
    if (point.out / "config.yaml").exists():
        return "interrupted"
    return "pending"


def command(spec: SweepSpec, point: Point) -> list[str]:
    """The training command of a point: resumes from its latest checkpoint where it has one."""
    overrides = {**spec.overrides, **point.overrides, "output_dir": str(point.out)}
    resumable = _config(spec.config, overrides).method.capabilities().resumable
    if state(point) in ("interrupted", "failed") and resumable and (point.out / "latest").exists():
        overrides["resume_from_checkpoint"] = "latest"
    else:
        overrides["overwrite_output_dir"] = True
    args = _args(overrides)
    if spec.launcher == "python":
        return [sys.executable, "-m", "dszo", "train", "--config", spec.config, *args]
    # deepspeed / torchrun / launch/sim_cluster.sh N R: each runs the training script as a cluster would
    return [*launcher_words(spec.launcher), "dszo/train.py", "--config", spec.config, *args]


def launcher_words(launcher: str) -> list[str]:
    """The launcher's command words, a bare launcher name resolved in this interpreter's environment first:
    `.venv/bin/python -m dszo sweep` runs the virtualenv's `deepspeed` even where that is not on PATH."""
    words = shlex.split(launcher)
    beside = Path(sys.executable).parent / words[0]
    if "/" not in words[0] and beside.is_file():
        words[0] = str(beside)
    return words


def run_point(spec: SweepSpec, point: Point) -> bool:
    cmd = command(spec, point)
    point.out.mkdir(parents=True, exist_ok=True)
    (point.out / "failed.json").unlink(missing_ok=True)
    print(f"[sweep] point {point.index}: {point.name}", flush=True)
    tic = time.perf_counter()
    with open(point.out / "sweep.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        except KeyboardInterrupt:   # Ctrl-C reached the run too: it saves a checkpoint and exits; wait for that
            proc.wait()
            raise
    if code == EXIT_STOPPED:
        raise SweepStopped(f"point {point.index} was stopped by a signal after saving a checkpoint; run the sweep "
                           "again to resume it")
    if code != 0:
        tail = (point.out / "sweep.log").read_text(errors="replace").splitlines()[-15:]
        outcome = "diverged" if code == EXIT_DIVERGED else "failed"
        (point.out / f"{outcome}.json").write_text(json.dumps({"exit_code": code, "command": cmd, "log_tail": tail},
                                                              indent=2) + "\n")
        print(f"[sweep] point {point.index} {outcome} (exit {code}); see {point.out / 'sweep.log'}", flush=True)
        return outcome == "diverged"
    print(f"[sweep] point {point.index} done in {time.perf_counter() - tic:.0f} s", flush=True)
    return True


def example_forwards_per_step(cfg, world_size: int) -> float:
    """Example-forward passes a step costs: ZO methods measure each example at +eps and -eps per direction (AGZO:
    one f0 a step, then f+ per direction); the first-order reference counts as 3 (a backward costs about two
    forwards)."""
    examples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    caps = cfg.method.capabilities()
    if not caps.zeroth_order:
        return examples * 3
    return examples * (caps.forwards_per_step + caps.forwards_per_direction * getattr(cfg.method, "num_directions", 1))


def run_row(out: Path) -> dict:
    """A finished run folder's summary row: results.json, the example-forwards it cost, its dev (and test)
    curves by example-forwards. Also what reads runs made outside a sweep (slurm/sweep.sh's node counts)."""
    results = json.loads((out / "results.json").read_text())
    cfg = load_config(str(out / "config.yaml"))
    per_step = example_forwards_per_step(cfg, results.get("world_size", 1))
    metrics = read_metrics(out)
    evals = [m for m in metrics if m.get("event") == "eval"]
    return {**{k: v for k, v in results.items() if k != "event"},
            "example_forwards": per_step * results["steps"],
            "dev_curve": [[m["step"] * per_step, m.get("eval_accuracy")] for m in evals],
            "dev_loss_curve": [[m["step"] * per_step, m.get("eval_loss")] for m in evals],
            # a loaded-back dev-best model's test (model_step) is not a point of the run's trajectory
            "test_curve": [[m["step"] * per_step, m.get("test_accuracy")] for m in metrics
                           if m.get("event") == "test" and "model_step" not in m],
            "dev_accuracy_best": max((m.get("eval_accuracy") or 0 for m in evals), default=None)}


def kept_rows(folder: Optional[str | Path]) -> dict[str, dict]:
    """The points a kept copy of the sweep's summary (`--kept DIR`: DIR/summary.json, e.g. the one committed under
    benchmarks/results/sweeps/<name>/) records as finished -- done or diverged -- by name: on a fresh machine,
    whose run folders are gone, they are not run again and their rows stay in the summary."""
    path = Path(folder) / "summary.json" if folder else None
    if path is None or not path.exists():
        return {}
    return {r["name"]: r for r in json.loads(path.read_text())["rows"] if r.get("state") in ("done", "diverged")}


def summarize(spec: SweepSpec, points: Optional[list[Point]] = None, kept: Optional[dict] = None) -> list[dict]:
    """One row per point: its overrides, state, the end-of-run results and the dev curve (summary.json/csv); a
    point with no finished run of its own keeps its row from `kept` (kept_rows) where that has one."""
    from dszo.sweep_report import write_summary

    rows = []
    for p in points or expand(spec):
        row = {"point": p.index, "name": p.name, **p.overrides, "state": state(p)}
        if row["state"] == "done":
            row.update(run_row(p.out))
        elif row["state"] != "diverged" and p.name in (kept or {}):
            row = {**kept[p.name], "point": p.index}
        rows.append(row)
    write_summary(spec, rows)
    return rows


def main(spec_path: str, point: Optional[int], list_only: bool, summary_only: bool,
         kept_dir: Optional[str] = None) -> int:
    spec = load_spec(spec_path)
    points = expand(spec)
    kept = kept_rows(kept_dir)

    def shown_state(p: Point) -> str:
        own = state(p)
        return f"{kept[p.name]['state']} (kept)" if own not in ("done", "diverged") and p.name in kept else own

    if list_only:
        for p in points:
            print(f"{p.index:4d}  {shown_state(p):11}  {p.name}")
        return 0
    failed = 0
    if not summary_only:
        if point is not None and not 0 <= point < len(points):
            raise ConfigError(f"--point {point}: the sweep has points 0..{len(points) - 1}")
        try:
            for p in ([points[point]] if point is not None else points):
                if shown_state(p).split()[0] not in ("done", "diverged"):
                    failed += not run_point(spec, p)
        except (SweepStopped, KeyboardInterrupt) as e:
            print(f"[sweep] stopped: {e or 'interrupted'}", flush=True)
            summarize(spec, points, kept)
            return 143
    summarize(spec, points, kept)
    print(f"[sweep] summary in {Path(spec.output_dir) / 'summary.csv'}")
    return 1 if failed else 0
