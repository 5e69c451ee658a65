#!/usr/bin/env bash
# Stage 1 of the fair method comparison (issue 15): learning-rate probes of every method on the dev split
# (sweeps/probe_<method>.yaml: 100 steps, one process with all cores, resumable). Interrupt it at any time and
# run it again: finished points are kept, interrupted ones resume from their checkpoint. After each sweep its
# summary is copied to benchmarks/results/sweeps/probe_<method>/ (committed; the run folders are not).
#   bash benchmarks/method_tuning.sh                 # METHODS="zo_act mezo" for a subset
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "method_tuning: run 'bash launch/setup.sh' first" >&2; exit 2; }
status=0
for m in ${METHODS:-zo_act mezo lozo agzo lozo_m first_order}; do
  HF_HUB_OFFLINE=1 .venv/bin/python -m dszo sweep "sweeps/probe_$m.yaml" --kept "benchmarks/results/sweeps/probe_$m"
  rc=$?; [ $rc -eq 143 ] && exit 143   # interrupted: stop here; running it again resumes
  [ $rc -eq 0 ] || status=1
  mkdir -p "benchmarks/results/sweeps/probe_$m"
  cp runs/sweeps/probe_$m/summary.{json,csv} "benchmarks/results/sweeps/probe_$m/" 2>/dev/null
  cp runs/sweeps/probe_$m/summary.png "benchmarks/results/sweeps/probe_$m/" 2>/dev/null
done
exit $status
