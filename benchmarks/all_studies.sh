#!/usr/bin/env bash
# Every long study of issues 15 and 16, one after another, each resumable: interrupt it at any time (Ctrl-C, or
# the end of a session) and run it again; finished runs are kept, interrupted ones resume from their checkpoint.
#   1. benchmarks/method_comparison.sh   learning-rate probes of every method, then each at its best setting
#                                        (2 seeds, test curves) -> benchmarks/results/method_comparison.{json,png}
#   2. sweeps/zo_act_{recipe,fp32,refresh}.yaml  ZO-Act: lr decay, eps, rank / the fp32 base / refreshed bases,
#                                        else as its final runs
#   3. sweeps/transfer.yaml              the main job's recipe on a second model and a second task (needs
#                                        bash launch/setup.sh --transfer)
#   4. benchmarks/direction_scaling.sh   data vs direction parallelism at 1, 2, 4 nodes
#                                        -> benchmarks/results/direction_scaling.{json,png}
#   5. benchmarks/projection.py          time to accuracy on clusters from 4.
# Hours on this 2-core machine (the probes ~2.5 h, the final runs ~5 h, recipe, fp32, refresh and transfer ~3 h,
# the scaling study ~4 h).
set -uo pipefail
cd "$(dirname "$0")/.."
bash benchmarks/method_comparison.sh
for name in zo_act_recipe zo_act_fp32 zo_act_refresh transfer; do
  HF_HUB_OFFLINE=1 .venv/bin/python -m dszo sweep "sweeps/$name.yaml"
  mkdir -p "benchmarks/results/sweeps/$name" && cp runs/sweeps/$name/summary.* "benchmarks/results/sweeps/$name/" 2>/dev/null
done
bash benchmarks/direction_scaling.sh
.venv/bin/python benchmarks/projection.py
