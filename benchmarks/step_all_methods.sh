#!/usr/bin/env bash
# Step time and per-rank peak RSS of every method vs plain forwards of the same batch (2 ranks, ZeRO-3),
# on the bundled model and task: benchmarks/results/step_<method>.json, then a table on stdout.
# METHODS="lozo agzo" re-measures only those (the table reads every results file).
set -euo pipefail
cd "$(dirname "$0")/.."
for m in ${METHODS:-zo_act mezo lozo lozo_m agzo first_order}; do
  .venv/bin/deepspeed --num_gpus 2 benchmarks/spine_step.py --config "configs/rotten_tomatoes_$m.yaml" \
    --reps "${REPS:-4}" --out "benchmarks/results/step_$m.json" > "/tmp/dszo_step_$m.log" 2>&1
done
.venv/bin/python - <<'PY'
import json
print(f"{'method':8} {'step s':>7} {'fwd[b;b] s':>10} {'2 fwd s':>8} {'step/2fwd':>9} {'RSS step/fwd':>12} {'step MB':>8}")
for m in ("zo_act", "mezo", "lozo", "lozo_m", "agzo", "first_order"):
    d = json.load(open(f"benchmarks/results/step_{m}.json"))
    s = d["summary"]
    mb = max(r["step_peak_rss_mb"] for r in d["per_rank"])
    print(f"{m:8} {s['step_median_s']:7.2f} {s['fwd2x_median_s']:10.2f} {s['two_fwd_median_s']:8.2f} "
          f"{s['step_over_two_fwd']:9.2f} {s['peak_rss_step_over_forward']:12.2f} {mb:8.0f}")
PY
