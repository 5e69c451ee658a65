#!/usr/bin/env bash
# Which launcher makes a method's step fastest on this 2-core machine? The bundled task's runs (the comparison's
# settings, global batch 16) for 20 steps without evaluation, each as 2 ranks of one thread -- on one node
# through deepspeed (ZeRO-3 shards the base, gathers through shared memory) or as 2 simulated nodes of one rank
# (launch/sim_cluster.sh 2 1: a whole copy each, no gathers) -- against one process with 2 threads (the seed-42
# final runs' mean step, benchmarks/results/sweeps/final_<m>/). The studies' later runs use the fastest
# (benchmarks/method_comparison.py LAUNCHERS); one node of 2 ranks for the others: benchmarks/results/step_<m>.json.
#   bash benchmarks/launcher_step.sh        -> benchmarks/results/launcher_step.json   (~8 min)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${TMPDIR:-/tmp}/dszo_launcher_step; mkdir -p "$OUT"
common=(--max_steps 20 --eval_steps 0 --eval_before_training false --save_steps 0 --disable_tqdm true
        --overwrite_output_dir true --per_device_train_batch_size 8)
zo_act=(--config configs/rotten_tomatoes_zo_act.yaml --method.target_modules '["down_proj"]' --learning_rate 0.003 --direction_groups 1)
mezo=(--config configs/rotten_tomatoes_mezo.yaml --method.directions rademacher --learning_rate 3.3e-5)
lozo=(--config configs/rotten_tomatoes_lozo.yaml --learning_rate 3.3e-5)
lozo_m=(--config configs/rotten_tomatoes_lozo_m.yaml --learning_rate 1e-4)
agzo=(--config configs/rotten_tomatoes_agzo.yaml --learning_rate 1e-4)
run() {   # NAME COMMAND...: runs COMMAND with the common arguments, timed, into $OUT/NAME
  local name=$1; shift
  /usr/bin/time -f "%e %S %R" -o "$OUT/$name.time" "$@" "${common[@]}" --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed: $OUT/$name.log" >&2; tail -5 "$OUT/$name.log" >&2; }
}
for m in mezo lozo lozo_m agzo zo_act; do
  args="$m[@]"
  run ${m}_sim2 bash launch/sim_cluster.sh 2 1 dszo/train.py "${!args}"
done
run zo_act_node2 .venv/bin/deepspeed --num_gpus 2 dszo/train.py "${zo_act[@]}"
OUT="$OUT" .venv/bin/python - <<'PY'
import json, os, sys
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.common import environment
out = Path(os.environ["OUT"])
runs = {}
for d in sorted(p for p in out.iterdir() if (p / "results.json").exists()):
    r = json.loads((d / "results.json").read_text())
    wall, sys_s, faults = (out / f"{d.name}.time").read_text().split()[-3:]
    runs[d.name] = {"mean_step_s": r["mean_step_s"], "world_size": r["world_size"], "peak_rss_mb": r["peak_rss_mb"],
                    "process_wall_s": float(wall), "system_cpu_s": float(sys_s), "minor_page_faults": int(faults)}
one = {}
for m in ("zo_act", "mezo", "lozo_m", "lozo", "agzo", "first_order"):
    p = Path(f"benchmarks/results/sweeps/final_{m}/summary.json")
    if p.exists():
        row = json.loads(p.read_text())["rows"][0]
        one[m] = {"mean_step_s": row["mean_step_s"], "world_size": row.get("world_size", 1), "steps": row["steps"]}
res = {"benchmark": "launcher_step", "environment": environment(), "command": "bash benchmarks/launcher_step.sh",
       "runs": runs, "one_process_final_runs": one}
Path("benchmarks/results/launcher_step.json").write_text(json.dumps(res, indent=1) + "\n")
for k, v in runs.items():
    print(f"{k:24} {v['mean_step_s']:.2f} s/step  sys {v['system_cpu_s']:.0f} s  faults {v['minor_page_faults']}")
for k, v in one.items():
    print(f"{k + ' (one process)':24} {v['mean_step_s']:.2f} s/step")
PY
