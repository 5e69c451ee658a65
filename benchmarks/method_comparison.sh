#!/usr/bin/env bash
# Method comparison on the bundled task: dev accuracy vs forward passes, every method and the first-order
# reference at the same forward budget, each from its configs/rotten_tomatoes_<method>.yaml (one process:
# by I1 the result does not depend on the world size). Runs land in runs/compare/; the table, JSON and plot
# come from benchmarks/method_comparison.py.
#   BUDGET_STEPS  ZO steps (FO gets 2/3 of them: forward + backward ≈ 3 forwards vs the ZO methods' 2)
#   EVAL_EVERY    ZO evaluation interval in steps
#   RUNS          "method:lr" pairs (lr empty = the config's)
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_STEPS=${BUDGET_STEPS:-100}
EVAL_EVERY=${EVAL_EVERY:-25}
RUNS=${RUNS:-"zo_act: first_order: mezo: lozo: lozo_m: agzo:"}
mkdir -p runs/compare
for spec in $RUNS; do
  m=${spec%%:*}; lr=${spec#*:}
  steps=$BUDGET_STEPS; every=$EVAL_EVERY
  if [ "$m" = first_order ]; then steps=$((BUDGET_STEPS * 2 / 3)); every=$((EVAL_EVERY * 2 / 3)); fi
  name=$m${lr:+-lr$lr}
  extra=(); [ -n "$lr" ] && extra=(--learning_rate "$lr")
  echo "[method_comparison] $name: $steps steps, eval every $every" >&2
  HF_HUB_OFFLINE=1 .venv/bin/python dszo/train.py --config "configs/rotten_tomatoes_$m.yaml" --max_steps "$steps" \
    --eval_steps "$every" --output_dir "runs/compare/$name" --overwrite_output_dir true --disable_tqdm true \
    "${extra[@]}" > "runs/compare/$name.log" 2>&1 || { echo "$name failed: runs/compare/$name.log" >&2; exit 1; }
done
.venv/bin/python benchmarks/method_comparison.py runs/compare --out benchmarks/results/method_comparison.json \
  --plot benchmarks/results/method_comparison.png
