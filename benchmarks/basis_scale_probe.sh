#!/usr/bin/env bash
# Which basis scale / learning rate for the main job: 60-step single-process ZO-Act runs on SmolLM2-135M,
# batch 16, r = 1, dev 200. Writes benchmarks/results/basis_scale_probe.json.
set -euo pipefail
cd "$(dirname "$0")/.."
run() {  # name, extra overrides...
  local name=$1; shift
  .venv/bin/python dszo/train.py --config configs/rotten_tomatoes_zo_act.yaml --max_steps 60 \
    --per_device_train_batch_size 16 --data.dev_size 200 --output_dir "/tmp/dszo_probe_$name" \
    --overwrite_output_dir true --disable_tqdm true --direction_groups 1 "$@" > "/tmp/dszo_probe_$name.log" 2>&1
}
run unit_rms_lr2e-2 --method.basis_scale unit_rms --learning_rate 2e-2
run unit_rms_lr5e-3 --method.basis_scale unit_rms --learning_rate 5e-3
run orthonormal_lr1e-3 --method.basis_scale orthonormal --learning_rate 1e-3
.venv/bin/python - <<'PY'
import json, sys
sys.path.insert(0, ".")
from benchmarks.common import environment
out = {"benchmark": "basis_scale_probe", "environment": environment(), "runs": {}}
for name in ("unit_rms_lr2e-2", "unit_rms_lr5e-3", "orthonormal_lr1e-3"):
    out["runs"][name] = json.load(open(f"/tmp/dszo_probe_{name}/results.json"))
json.dump(out, open("benchmarks/results/basis_scale_probe.json", "w"), indent=2)
PY
