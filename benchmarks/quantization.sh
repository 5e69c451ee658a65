#!/usr/bin/env bash
# ZO-Act on SmolLM2-135M with the frozen base as fp32 (none), int8, nf4 and fp4:
#  1. per-rank quantized-weight bytes, peak RSS and step time on 1 and 2 ranks (spine_step.py, main-job config)
#  2. dev accuracy after the same fine-tuning budget (STEPS steps of the main-job config, one process)
# -> benchmarks/results/quantization.json (+ a table on stdout). Run alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-40}
KINDS=${KINDS:-"none int8 nf4 fp4"}
mkdir -p runs/quant
export HF_HUB_OFFLINE=1
for q in $KINDS; do
  for n in 1 2; do
    # A rerun keeps what an earlier (partial) run measured; delete runs/quant to measure again.
    if [ -f "runs/quant/step_${q}_r$n.json" ]; then continue; fi
    echo "[quantization] $q: step on $n rank(s)" >&2
    .venv/bin/deepspeed --num_gpus "$n" benchmarks/spine_step.py --config configs/rotten_tomatoes_zo_act.yaml \
      --reps "${REPS:-4}" --out "runs/quant/step_${q}_r$n.json" --model.quantization "$q" \
      > "runs/quant/step_${q}_r$n.log" 2>&1
  done
  if [ -f "runs/quant/train_$q/results.json" ]; then continue; fi
  echo "[quantization] $q: $STEPS training steps" >&2
  .venv/bin/python dszo/train.py --config configs/rotten_tomatoes_zo_act.yaml --model.quantization "$q" \
    --max_steps "$STEPS" --output_dir "runs/quant/train_$q" --overwrite_output_dir true --disable_tqdm true --direction_groups 1 \
    > "runs/quant/train_$q.log" 2>&1
done
.venv/bin/python benchmarks/quantization.py runs/quant --out benchmarks/results/quantization.json
