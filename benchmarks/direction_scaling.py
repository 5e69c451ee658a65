"""What do more nodes buy? Data parallelism vs direction parallelism on 1, 2 and 4 simulated nodes (issue 16).

    python benchmarks/direction_scaling.py plan      # sweeps/scaling_<method>_n<N>.yaml at the tuned setting
    python -m dszo sweep sweeps/scaling_<method>_n<N>.yaml   (resumable; N simulated nodes: needs root + iproute2)
    python benchmarks/direction_scaling.py report    # benchmarks/results/direction_scaling.{json,png}
    (bash benchmarks/direction_scaling.sh does all of it.)

Every run takes the same number of steps from the same start. On N nodes (one rank each, per-rank batch b):
  data        direction_groups 1: one direction a step, global batch N·b
  directions  direction_groups N: N directions a step, each on its node's b examples
The tuned setting is the method's best learning rate from its probes (benchmarks/method_comparison.py). On this
2-core machine the time axis is the step (only scalars cross nodes either way: the runs record the bytes).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.method_comparison import _curve_stats, _summary, best_probe  # noqa: E402

NODES = (1, 2, 4)
METHODS = ("zo_act", "mezo")
STEPS, EVERY, BATCH, SEEDS = 300, 50, 8, [42]


def plan() -> None:
    for m in METHODS:
        found = best_probe(m)
        if found is None:
            print(f"{m}: no finished probe yet (benchmarks/method_tuning.sh)")
            continue
        keys = found[0]
        for n in NODES:
            points = [{**keys, "direction_groups": 1}] + ([{**keys, "direction_groups": n}] if n > 1 else [])
            spec = {"config": f"configs/rotten_tomatoes_{m}.yaml", "output_dir": f"runs/sweeps/scaling_{m}_n{n}",
                    "points": points, "seeds": SEEDS,
                    "launcher": "python" if n == 1 else f"bash launch/sim_cluster.sh {n} 1",
                    "overrides": {"per_device_train_batch_size": BATCH, "max_steps": STEPS, "eval_steps": EVERY,
                                  "test_eval_steps": EVERY, "partition": "node" if n > 1 else "auto",
                                  "save_steps": EVERY, "disable_tqdm": True}}
            path = Path(f"sweeps/scaling_{m}_n{n}.yaml")
            path.write_text("# Written by benchmarks/direction_scaling.py plan.\n" + yaml.safe_dump(spec, sort_keys=False))
            print(f"{m} n={n}: {path}")


def _bytes_per_step(run_dir: Path) -> dict:
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"comm"' in x]
    reach = lambda k: statistics.median(s["comm"]["reach"].get(k, 0) for s in steps) if steps else None  # noqa: E731
    return {"spans_nodes": reach("spans_nodes"), "within_node": reach("within_node")}


def report(out: Path, plot: Path) -> None:
    from benchmarks.common import environment

    results = {}
    for m in METHODS:
        for n in NODES:
            spec, rows = _summary(f"scaling_{m}_n{n}")
            for r in (x for x in rows if x["state"] == "done"):
                mode = "data" if r["direction_groups"] == 1 else "directions"
                key = f"{m} n={n} {mode}"
                results.setdefault(key, {"method": m, "nodes": n, "mode": mode, "runs": []})["runs"].append(r)
    table = {}
    for key, res in results.items():
        runs = res.pop("runs")
        folder = Path(f"runs/sweeps/scaling_{res['method']}_n{res['nodes']}") / runs[0]["name"]
        table[key] = {**res, "test_accuracy": [r["test_accuracy"] for r in runs], "steps": runs[0]["steps"],
                      "example_forwards": runs[0]["example_forwards"], "mean_step_s": [r["mean_step_s"] for r in runs],
                      "test_curve": _curve_stats(runs, "test_curve"), "dev_curve": _curve_stats(runs, "dev_curve"),
                      "bytes_per_step": _bytes_per_step(folder) if folder.exists() else None}
    out.write_text(json.dumps({"benchmark": "direction_scaling", "environment": environment(),
                               "command": "bash benchmarks/direction_scaling.sh", "runs": table}, indent=1) + "\n")
    for key, r in table.items():
        print(f"{key:28} test {statistics.fmean(r['test_accuracy']):.3f}  bytes/step {r['bytes_per_step']}")
    _plot(table, plot)


def _plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, r in table.items():
        c = r["dev_curve"]
        if not c:
            continue
        per_step = r["example_forwards"] / r["steps"]
        style = "-" if r["mode"] == "data" else "--"
        axes[0].plot([x[0] / per_step for x in c], [x[1] for x in c], style, marker="o", label=key)
        axes[1].plot([x[0] for x in c], [x[1] for x in c], style, marker="o", label=key)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("example-forward passes")
    for ax in axes:
        ax.set_ylabel("dev accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from benchmarks.common import staged_main

    staged_main("direction_scaling", plan, report)
