"""What do more nodes buy? Data parallelism vs direction parallelism on 1, 2 and 4 nodes (issue 16).

    python benchmarks/direction_scaling.py plan      # sweeps/scaling_<method>.yaml at the tuned setting,
                                                     # sweeps/scaling_bytes.yaml (4 simulated nodes, 3 steps)
    python -m dszo sweep sweeps/scaling_<method>.yaml   (resumable)
    python benchmarks/direction_scaling.py report    # benchmarks/results/direction_scaling.{json,png}
    (bash benchmarks/direction_scaling.sh does all of it.)

On a Slurm cluster, the same study at the tuned setting (data and directions at each node count, one job each):
    CONFIG=configs/rotten_tomatoes_zo_act.yaml SWEEP=scaling MODES="data directions" NODE_COUNTS="1 2 4 8" \
      EXTRA_ARGS="--max_steps 300 --eval_steps 50 --eval_before_training true --do_predict true" slurm/sweep.sh
    python benchmarks/direction_scaling.py report --runs runs/scaling --out ... --plot ...

Every run takes the same number of steps from the same start. On N nodes (one rank each, b examples a node):
  data        direction_groups 1: one direction a step, global batch N·b
  directions  direction_groups N: N directions a step, each measured on its node's b examples
The tuned setting is the one the method comparison settled on (benchmarks/method_comparison.py tuned_setting:
the best probe's learning rate, or a third of it where that diverged over the final budget).

Each accuracy run goes where its method's step is fastest on this machine, whatever N it stands for
(benchmarks/method_comparison.py launch_for: ZO-Act on one node of 2 ranks, MeZO in one process). That is the same
run as N nodes, not an approximation: a run's trajectory does not depend on its world size (invariant I1,
tests/test_distributed.py), and G direction groups on fewer nodes measure the same G directions on the same
per-direction examples, each node several in turn (dszo.comm.direction_slots; tests/test_direction_groups.py:
2 simulated nodes = 1 rank, within fp32 rounding); 4 real processes would only share the same 2 cores. What N
nodes change is the wall time of a step, so the bytes that cross nodes are measured in a short run on 4 simulated
nodes (network namespaces, real TCP, sweeps/scaling_bytes.yaml). On this machine the time axis is therefore the
step; benchmarks/projection.py turns steps into time on clusters.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.method_comparison import PINNED, _curve_stats, _summary, launch_for, tuned_setting  # noqa: E402

NODES = (1, 2, 4)
RUN_ORDER = (1, 4, 2)   # the target compares 4 nodes with 1: those runs come first, so a cut-short study still answers it
METHODS = ("zo_act", "mezo")
STEPS, DEV_EVERY, BATCH, SEEDS = 300, 50, 8, [42]   # dev every 50: every 25 spent ~40 % of a 1-node run evaluating


def _write(name: str, spec: dict) -> None:
    path = Path(f"sweeps/{name}.yaml")
    path.write_text("# Written by benchmarks/direction_scaling.py plan.\n" + yaml.safe_dump(json.loads(json.dumps(spec)), sort_keys=False))  # no YAML aliases
    print(f"{name}: {path} ({len(spec['points'])} points)")


def plan() -> None:
    for m in METHODS:
        keys = tuned_setting(m)
        if keys is None:
            print(f"{m}: no finished probe yet (benchmarks/method_tuning.sh)")
            continue
        launcher, ranks = launch_for(m)
        points = [{**keys, "per_device_train_batch_size": BATCH * n // ranks, "direction_groups": g}
                  for n in RUN_ORDER for g in sorted({n, 1}, reverse=True)]
        _write(f"scaling_{m}", {
            "config": f"configs/rotten_tomatoes_{m}.yaml", "output_dir": f"runs/sweeps/scaling_{m}",
            "points": points, "seeds": SEEDS, "launcher": launcher,
            "overrides": {**PINNED.get(m, {}), "max_steps": STEPS, "lr_scheduler_type": "constant", "warmup_steps": 0,
                          "eval_steps": DEV_EVERY, "eval_before_training": True,
                          "do_predict": True, "save_steps": 50, "disable_tqdm": True}})
        if m == "zo_act":   # the bytes per step on 4 real (simulated) nodes, both modes
            _write("scaling_bytes", {
                "config": f"configs/rotten_tomatoes_{m}.yaml", "output_dir": "runs/sweeps/scaling_bytes",
                "points": [{**keys, "direction_groups": g} for g in (1, NODES[-1])], "seeds": SEEDS,
                "launcher": f"bash launch/sim_cluster.sh {NODES[-1]} 1",
                "overrides": {**PINNED[m], "per_device_train_batch_size": BATCH, "max_steps": 3, "eval_steps": 0,
                              "eval_before_training": False, "partition": "node", "save_steps": 0,
                              "disable_tqdm": True}})


def steps_to_reach(curve: list, per_step: float, target: float, lower_is_better: bool) -> float | None:
    """The first evaluated step at which the curve ([example-forwards, mean over seeds, ...] points) reaches the
    target (None: never within the run)."""
    for x, y, *_ in curve:
        if y is not None and (y <= target if lower_is_better else y >= target):
            return x / per_step
    return None


BYTES_COPY = "benchmarks/results/sweeps"   # where direction_scaling.sh keeps the byte runs' metrics.jsonl


def _bytes_per_step() -> dict:
    """Median bytes a step, by reach, in the 4-simulated-node runs of each mode (rank 0's counters)."""
    found = {}
    for r in (x for x in _summary("scaling_bytes")[1] if x["state"] == "done"):
        paths = [Path(root) / "scaling_bytes" / r["name"] / "metrics.jsonl" for root in ("runs/sweeps", BYTES_COPY)]
        path = next((p for p in paths if p.exists()), None)
        steps = [json.loads(x)["comm"] for x in path.read_text().splitlines() if '"comm"' in x] if path else []
        if steps:
            mode = "directions" if r["direction_groups"] > 1 else "data"
            found[mode] = {"nodes": NODES[-1], "direction_groups": r["direction_groups"],
                           **{k: statistics.median(s["reach"].get(k, 0) for s in steps)
                              for k in ("spans_nodes", "within_node")}}
    return found


def cluster_rows(root: Path) -> dict[str, list[dict]]:
    """The runs of slurm/sweep.sh (MODES="data directions": runs/<SWEEP>/nodes<N>[-directions]/), as rows like a
    sweep summary's, by method; N from the folder's name."""
    from dszo.config import load_config
    from dszo.sweep import run_row

    found: dict = {}
    for out in sorted(p for p in Path(root).iterdir() if (p / "results.json").exists()):
        nodes = re.fullmatch(r"nodes(\d+)(-directions)?", out.name)
        if nodes is None:
            continue
        cfg = load_config(str(out / "config.yaml"))
        found.setdefault(cfg.method.name, []).append({
            "state": "done", "name": out.name, "nodes": int(nodes.group(1)), "seed": cfg.seed,
            "learning_rate": cfg.learning_rate, "direction_groups": cfg.direction_groups, **run_row(out)})
    return found


def _table(rows_by_method: dict | None = None) -> dict:
    """Runs by (method, nodes, mode): the local sweeps' summaries, or rows_by_method (a cluster's runs)."""
    runs: dict = {}
    for m in METHODS:
        rows = _summary(f"scaling_{m}")[1] if rows_by_method is None else rows_by_method.get(m, [])
        for r in (x for x in rows if x["state"] == "done"):
            mode = "directions" if r["direction_groups"] > 1 else "data"
            # N nodes of BATCH examples measure 2·N·BATCH example-forwards a step in either mode (data: one
            # direction on N·BATCH; directions: N on BATCH each), whatever the world size or accumulation
            nodes = r.get("nodes") or round(r["example_forwards"] / r["steps"] / (2 * BATCH))
            runs.setdefault((m, nodes, mode), []).append(r)
    table = {}
    for (m, n, mode), rs in sorted(runs.items()):
        table[f"{m} n={n} {mode}"] = {
            "method": m, "nodes": n, "mode": mode, "steps": rs[0]["steps"], "example_forwards": rs[0]["example_forwards"],
            "learning_rate": rs[0].get("learning_rate"), "seeds": [r["seed"] for r in rs],
            "test_accuracy": [r["test_accuracy"] for r in rs], "test_majority_rate": rs[0].get("test_majority_rate"),
            "dev_accuracy": [r["dev_accuracy_after"] for r in rs], "dev_loss": [r["dev_loss_after"] for r in rs],
            "mean_step_s": [r["mean_step_s"] for r in rs], "world_size": [r.get("world_size", 1) for r in rs],
            "dev_curve": _curve_stats(rs, "dev_curve"), "dev_loss_curve": _curve_stats(rs, "dev_loss_curve")}
    for r in table.values():   # the target: the 1-node run's final dev accuracy (and loss), in how many steps
        base = table.get(f"{r['method']} n=1 data")
        if base:
            per_step = r["example_forwards"] / r["steps"]
            r["steps_to_1node_final"] = {
                "dev_accuracy": steps_to_reach(r["dev_curve"], per_step, statistics.fmean(base["dev_accuracy"]), False),
                "dev_loss": steps_to_reach(r["dev_loss_curve"], per_step, statistics.fmean(base["dev_loss"]), True)}
    return table


def report(out: Path, plot: Path, runs: str | None = None) -> None:
    from benchmarks.common import environment

    table = _table(cluster_rows(Path(runs)) if runs else None)
    command = (f"python benchmarks/direction_scaling.py report --runs {runs}" if runs
               else "bash benchmarks/direction_scaling.sh")
    out.write_text(json.dumps({"benchmark": "direction_scaling", "environment": environment(), "command": command,
                               "nodes_per_run_note": __doc__,
                               "bytes_per_step_4_nodes": {} if runs else _bytes_per_step(), "runs": table},
                              indent=1) + "\n")
    print(f"{'run':26} {'dev acc':>7} {'dev loss':>8} {'test acc':>8}  steps to the 1-node final (acc / loss)")
    for key, r in table.items():
        reach = r.get("steps_to_1node_final", {})
        print(f"{key:26} {statistics.fmean(r['dev_accuracy']):7.3f} {statistics.fmean(r['dev_loss']):8.4f} "
              f"{statistics.fmean(r['test_accuracy']):8.3f}  {reach.get('dev_accuracy')} / {reach.get('dev_loss')}")
    _plot(table, plot)


def _plot(table: dict, path: Path) -> None:
    """Per method: dev accuracy by step, dev loss by step, dev accuracy by example-forward passes; each run's
    test accuracy (evaluated once, at the end) as a cross at its last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(r["method"] == m for r in table.values())] or list(METHODS[:1])
    fig, axes = plt.subplots(len(methods), 3, figsize=(17, 4 * len(methods)), squeeze=False)
    for row, m in zip(axes, methods):
        for r in (r for r in table.values() if r["method"] == m):
            per_step = r["example_forwards"] / r["steps"]
            style = "-" if r["mode"] == "data" else "--"
            label = f"{r['nodes']} nodes, {r['mode']}" if r["nodes"] > 1 else "1 node (either mode)"
            test = statistics.fmean(r["test_accuracy"])
            for ax, curve, scale in ((row[0], r["dev_curve"], per_step), (row[1], r["dev_loss_curve"], per_step),
                                     (row[2], r["dev_curve"], 1.0)):
                line, = ax.plot([x[0] / scale for x in curve], [x[1] for x in curve], style, marker=".", label=label)
                if ax is not row[1]:
                    ax.plot([r["example_forwards"] / scale], [test], "x", color=line.get_color(), markersize=8)
        titles = ("dev accuracy (x: test) by step", "dev loss (candidates' cross-entropy) by step",
                  "dev accuracy (x: test) by example-forward passes")
        for ax, what, xlabel in zip(row, titles, ("step", "step", "example-forward passes")):
            ax.set_title(f"{m}: {what}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("data parallelism (batch x N, solid) vs direction parallelism (directions x N, dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from benchmarks.common import staged_main

    staged_main("direction_scaling", plan, report,
                report_options={"runs": "a cluster's runs instead of the local sweeps: slurm/sweep.sh's runs/<SWEEP>"})
