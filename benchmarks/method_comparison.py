"""Collect runs/compare/*/metrics.jsonl into a table, a JSON results file and a plot of dev accuracy vs
forward passes (see method_comparison.sh). Forward passes count example-forwards: ZO methods do two per
example and direction (L+ and L-; AGZO: L and L+), the first-order reference one forward and one backward,
counted as three (a backward costs about two forwards)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PASSES = {"first_order": 3}   # per example and step; ZO methods: 2 per direction


def collect(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    setup = next(r for r in records if r.get("event") == "setup")
    steps = [r for r in records if "event" not in r]
    end = next(r for r in records if r.get("event") == "end")
    method = run.name.split("-lr")[0]
    batch = steps[0]["num_examples"]
    per_example = PASSES.get(method, 2 * cfg["method"].get("num_directions", 1))
    evals = [{"step": r["step"], "forward_passes": r["step"] * batch * per_example, "accuracy": r["eval_accuracy"],
              "loss": r["eval_loss"]} for r in records if r.get("event") == "eval"]
    return {"run": run.name, "method": method, "lr": steps[0]["lr"] if steps else None, "global_batch": batch,
            "passes_per_example": per_example, "evals": evals, "mean_step_s": end["mean_step_s"],
            "wall_s": end["wall_s"], "world_size": setup["world_size"], "final_accuracy": end["dev_accuracy_after"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", required=True)
    args = ap.parse_args()
    from benchmarks.common import environment

    runs = [collect(p) for p in sorted(Path(args.root).iterdir()) if (p / "metrics.jsonl").exists()]
    Path(args.out).write_text(json.dumps({"environment": environment(), "runs": runs}, indent=1) + "\n")
    print(f"{'run':22} {'lr':>8} {'fwd passes':>10} {'acc start':>9} {'acc end':>8} {'best':>6} {'step s':>7}")
    for r in runs:
        accs = [e["accuracy"] for e in r["evals"]]
        print(f"{r['run']:22} {r['lr']:8.1e} {r['evals'][-1]['forward_passes']:10d} {accs[0]:9.3f} {accs[-1]:8.3f} "
              f"{max(accs):6.3f} {r['mean_step_s']:7.2f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        ax.plot([e["forward_passes"] for e in r["evals"]], [e["accuracy"] for e in r["evals"]], marker="o",
                label=f"{r['run']} (lr {r['lr']:.0e})", linestyle="--" if r["method"] == "first_order" else "-")
    ax.set_xlabel("example forward passes (first-order: forward + backward = 3)")
    ax.set_ylabel("dev accuracy (300 held-out examples)")
    ax.set_title("SmolLM2-135M, Rotten Tomatoes, same forward budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
