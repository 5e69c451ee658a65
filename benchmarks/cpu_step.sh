#!/usr/bin/env bash
# The main job's step on this CPU side by side with its yardstick (issue 14): a plain single-process forward
# (transformers, fp32, 2 threads) of the same doubled rows, then the 2-rank ZeRO-3 step and forward of
# benchmarks/spine_step.py on the fp32 and the nf4 base, each with ZeRO-3's gathers through shared memory
# (the default) and through gloo (DSZO_SHM_GATHER=0). Writes benchmarks/results/cpu_step.json.
#   CONFIG=configs/rotten_tomatoes_zo_act.yaml REPS=6 bash benchmarks/cpu_step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "cpu_step: run 'bash launch/setup.sh' first" >&2; exit 2; }
CONFIG=${CONFIG:-configs/rotten_tomatoes_zo_act.yaml}
REPS=${REPS:-6}
TMP=${TMPDIR:-/tmp}/dszo_cpu_step
mkdir -p "$TMP"
.venv/bin/python benchmarks/plain_forward.py --config "$CONFIG" --threads 2 --reps "$REPS" --out "$TMP/plain.json"
for quant in none nf4; do
  for shm in 1 0; do
    DSZO_SHM_GATHER=$shm .venv/bin/deepspeed --num_gpus 2 benchmarks/spine_step.py --config "$CONFIG" \
      --reps "$REPS" --out "$TMP/step_${quant}_shm$shm.json" --model.quantization "$quant" \
      > "$TMP/step_${quant}_shm$shm.log" 2>&1 || { tail -20 "$TMP/step_${quant}_shm$shm.log"; exit 1; }
  done
done
CONFIG="$CONFIG" TMP="$TMP" .venv/bin/python - <<'PY'
import json, os
tmp = os.environ["TMP"]
plain = json.load(open(f"{tmp}/plain.json"))
rows, base = [], plain["forward_median_s"]
for quant in ("none", "nf4"):
    for shm in ("1", "0"):
        d = json.load(open(f"{tmp}/step_{quant}_shm{shm}.json"))
        s = d["summary"]
        rows.append({"base": "fp32" if quant == "none" else quant, "gathers": "shared memory" if shm == "1" else "gloo",
                     "step_s": s["step_median_s"], "forward_doubled_s": s["fwd2x_median_s"],
                     "step_over_plain_forward": s["step_median_s"] / base,
                     "forward_over_plain_forward": s["fwd2x_median_s"] / base, "spine_step": d})
out = {"benchmark": "cpu_step", "config": os.environ["CONFIG"], "environment": plain["environment"],
       "command": "bash benchmarks/cpu_step.sh", "plain_forward": plain, "runs": rows}
json.dump(out, open("benchmarks/results/cpu_step.json", "w"), indent=2)
print(f"plain forward {plain['rows']} rows x tokens, {plain['threads']} threads: {base:.2f} s")
print(f"{'base':5} {'gathers':14} {'step s':>7} {'fwd[b;b] s':>10} {'step/plain':>10}")
for r in rows:
    print(f"{r['base']:5} {r['gathers']:14} {r['step_s']:7.2f} {r['forward_doubled_s']:10.2f} "
          f"{r['step_over_plain_forward']:10.2f}")
PY
