#!/usr/bin/env bash
# The README's main job, timed, and its figures recorded in benchmarks/results/main_job.json.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
/usr/bin/time -v .venv/bin/deepspeed --num_gpus 2 dszo/train.py --config configs/rotten_tomatoes_zo_act.yaml \
  2>&1 | tee benchmarks/results/main_job.log
.venv/bin/python benchmarks/main_job.py --log benchmarks/results/main_job.log
