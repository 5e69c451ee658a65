"""Summarise benchmarks/quantization.sh: runs/quant/{step_<q>_r<n>.json, train_<q>/} -> one results file."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from benchmarks.common import environment

    root, rows = Path(args.root), []
    for q in ("none", "int8", "nf4", "fp4"):
        row = {"quantization": q}
        for n in (1, 2):
            f = root / f"step_{q}_r{n}.json"
            if not f.exists():
                continue
            d = json.loads(f.read_text())
            ranks = d["per_rank"]
            row[f"r{n}"] = {
                "step_median_s": d["summary"]["step_median_s"],
                "quantized_weight_bytes_per_rank": [r["quantized_weight_bytes_local"] for r in ranks],
                "quantized_weight_bytes_total": ranks[0]["quantized_weight_bytes"],
                "setup_peak_rss_mb_per_rank": [round(r["setup_peak_rss_mb"]) for r in ranks],
                "step_peak_rss_mb_per_rank": [round(r["step_peak_rss_mb"]) for r in ranks],
            }
        res = root / f"train_{q}" / "results.json"
        if res.exists():
            r = json.loads(res.read_text())
            row["train"] = {k: r[k] for k in ("steps", "dev_accuracy_before", "dev_accuracy_after", "dev_loss_after",
                                              "mean_step_s", "wall_s")}
        rows.append(row)
    Path(args.out).write_text(json.dumps({"environment": environment(), "config": "configs/rotten_tomatoes_zo_act.yaml",
                                          "rows": rows}, indent=1) + "\n")
    print(f"{'quant':6} {'weights MB/rank r1':>18} {'r2':>12} {'RSS MB r1':>10} {'r2':>12} {'step s r1':>9} {'r2':>6} "
          f"{'acc before':>10} {'after':>6} {'train step s':>12}")
    for r in rows:
        one, two, tr = r.get("r1", {}), r.get("r2", {}), r.get("train", {})
        mb = lambda xs: "/".join(f"{x / 2**20:.1f}" for x in xs)  # noqa: E731
        print(f"{r['quantization']:6} {mb(one.get('quantized_weight_bytes_per_rank', [])):>18} "
              f"{mb(two.get('quantized_weight_bytes_per_rank', [])):>12} "
              f"{'/'.join(map(str, one.get('step_peak_rss_mb_per_rank', []))):>10} "
              f"{'/'.join(map(str, two.get('step_peak_rss_mb_per_rank', []))):>12} "
              f"{one.get('step_median_s', float('nan')):9.2f} {two.get('step_median_s', float('nan')):6.2f} "
              f"{tr.get('dev_accuracy_before', float('nan')):10.3f} {tr.get('dev_accuracy_after', float('nan')):6.3f} "
              f"{tr.get('mean_step_s', float('nan')):12.2f}")


if __name__ == "__main__":
    main()
