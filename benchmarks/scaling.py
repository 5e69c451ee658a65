"""Scaling study: the same training for a few steps at several node counts (and ranks per node).

    .venv/bin/python benchmarks/scaling.py --nodes 1 2 4 --ranks-per-node 1 --mode weak --steps 6
    .venv/bin/python benchmarks/scaling.py --nodes 1 2 --ranks-per-node 1 2 --mode strong --global-batch 16

One node runs under `deepspeed --num_gpus R`; several nodes under launch/sim_cluster.sh (network namespaces,
real TCP, one deepspeed launcher per node; needs root), exactly as on a cluster. weak: fixed per-rank batch;
strong: fixed global batch split over the ranks. Per configuration it records, from the main rank's
metrics.jsonl: median step time after warm-up and its breakdown (forward(s), all-reduce, update; what the
method reports), examples/s and tokens/s, bytes per step by kind (ZeRO-3 parameter gathers vs dszo's own
all-reduces) and by reach (collectives inside one node vs spanning nodes), and the main rank's peak RSS.
Writes <out>.json, <out>.csv and <out>.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GATHERS = ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather", "all_gather_coalesced")


def run_one(args, nodes: int, rpn: int, out: Path) -> dict:
    world = nodes * rpn
    per_rank = args.batch if args.mode == "weak" else max(1, args.global_batch // world)
    over = ["--max_steps", str(args.steps), "--output_dir", str(out), "--overwrite_output_dir", "true",
            "--per_device_train_batch_size", str(per_rank), "--logging_steps", "1", "--eval_before_training",
            "false", "--disable_tqdm", "true", "--data.dev_size", str(args.dev_size), "--partition", args.partition,
            "--direction_groups", "1"]   # data parallelism's step (the main job's config measures 2 directions)
    script = ["dszo/train.py", "--config", args.config, *over, *args.train_args.split()]
    bindir = Path(sys.executable).parent
    if nodes == 1:
        cmd = [str(bindir / "deepspeed"), "--num_gpus", str(rpn), *script]
    else:
        cmd = ["bash", "launch/sim_cluster.sh", str(nodes), str(rpn), *script]
    # Every simulated node shares this machine's cores: each rank gets cores / world threads (a launcher on a real
    # node would give it cores / local ranks, which here would oversubscribe the cores world/local times over).
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"run {nodes}x{rpn} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    setup = next(r for r in recs if r.get("event") == "setup")
    steps = [r for r in recs if "event" not in r][args.warmup:]
    med = lambda key: statistics.median(r.get(key, 0.0) for r in steps)  # noqa: E731
    step_s = med("step_s")
    breakdown = sorted({k for r in steps for k in r if k.endswith("_s") and k != "step_s"})
    comm_bytes = lambda pred: statistics.median(  # noqa: E731
        sum(v for k, v in r["comm"]["bytes"].items() if pred(k)) for r in steps)
    examples = statistics.median(r["num_examples"] for r in steps)
    return {
        "nodes": nodes, "ranks_per_node": rpn, "world_size": world, "mode": args.mode,
        "per_rank_batch": per_rank, "global_batch": per_rank * world, "partition": setup.get("partition"),
        "threads_per_rank": setup.get("threads"),
        "steps_measured": len(steps), "step_median_s": step_s,
        "breakdown_median_s": {k[:-2]: med(k) for k in breakdown},
        "examples_per_s": examples / step_s,
        "tokens_per_s": statistics.median(r["tokens_local"] for r in steps) * world / step_s,
        "bytes_per_step": {
            "zero3_gathers": comm_bytes(lambda k: k in GATHERS),
            "dszo_collectives": comm_bytes(lambda k: k not in GATHERS),
            "within_node": statistics.median(r["comm"].get("reach", {}).get("within_node", 0) for r in steps),
            "spanning_nodes": statistics.median(r["comm"].get("reach", {}).get("spans_nodes", 0) for r in steps),
        },
        "main_rank_peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in recs),
        "wall_s": time.perf_counter() - tic,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    labels = [f"{r['nodes']}x{r['ranks_per_node']}" for r in rows]
    bottom = [0.0] * len(rows)
    for part in sorted({k for r in rows for k in r["breakdown_median_s"]}):
        vals = [r["breakdown_median_s"].get(part, 0.0) for r in rows]
        ax[0].bar(labels, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax[0].plot(labels, [r["step_median_s"] for r in rows], "k_", markersize=30, label="step (median)")
    ax[0].set(title="step time and breakdown", xlabel="nodes x ranks", ylabel="s")
    ax[0].legend(fontsize=7)
    ax[1].plot(labels, [r["examples_per_s"] for r in rows], "o-")
    ax[1].set(title=f"throughput ({rows[0]['mode']} scaling)", xlabel="nodes x ranks", ylabel="examples / s")
    for key, style in (("within_node", "o-"), ("spanning_nodes", "s--")):
        ax[2].plot(labels, [max(1, r["bytes_per_step"][key]) for r in rows], style, label=key.replace("_", " "))
    ax[2].set_yscale("log")
    ax[2].set(title="collective bytes per step (main rank)", xlabel="nodes x ranks", ylabel="bytes")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/rotten_tomatoes_zo_act.yaml")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--ranks-per-node", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, default=0, help="threads per rank (0: cores / world size)")
    ap.add_argument("--mode", choices=["weak", "strong"], default="weak")
    ap.add_argument("--batch", type=int, default=4, help="weak: per-rank batch")
    ap.add_argument("--global-batch", type=int, default=16, help="strong: global batch")
    ap.add_argument("--partition", choices=["auto", "world", "node"], default="auto")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dev-size", type=int, default=16, help="the run's final evaluation is not what is timed")
    ap.add_argument("--train-args", default="", help='more train.py overrides, e.g. "--model.quantization none"')
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default="benchmarks/results/scaling")
    args = ap.parse_args()
    from benchmarks.common import environment

    rows = []
    for rpn in args.ranks_per_node:
        for n in args.nodes:
            print(f"[scaling] {n} node(s) x {rpn} rank(s), {args.mode}", file=sys.stderr)
            rows.append(run_one(args, n, rpn, REPO / "runs" / "scaling" / f"{args.mode}_{n}x{rpn}"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    env["command"] = "python " + " ".join(sys.argv)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "config": args.config, "rows": rows,
                                                    "note": "ranks of every simulated node share this machine's cores: "
                                                            "times show protocol overheads, not cluster speed-ups"},
                                                   indent=1) + "\n")
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["nodes", "ranks_per_node", "threads_per_rank", "mode", "global_batch", "step_median_s", "examples_per_s",
                    "tokens_per_s", "zero3_gather_bytes", "dszo_collective_bytes", "within_node_bytes",
                    "spanning_nodes_bytes", "main_rank_peak_rss_mb"])
        for r in rows:
            b = r["bytes_per_step"]
            w.writerow([r["nodes"], r["ranks_per_node"], r["threads_per_rank"], r["mode"], r["global_batch"], f"{r['step_median_s']:.3f}",
                        f"{r['examples_per_s']:.2f}", f"{r['tokens_per_s']:.1f}", b["zero3_gathers"],
                        b["dszo_collectives"], b["within_node"], b["spanning_nodes"], round(r["main_rank_peak_rss_mb"])])
    plot(rows, out.with_suffix(".png"))
    print(out.with_suffix(".csv").read_text())


if __name__ == "__main__":
    main()
