#!/usr/bin/env bash
# The scaling study of issue 16: ZO-Act and MeZO at their tuned learning rates on 1, 2 and 4 nodes, data
# parallelism (batch x N) vs direction parallelism (directions x N), the same steps; the accuracy runs where each
# method's step is fastest here (the same runs as N nodes: see benchmarks/direction_scaling.py), the bytes across
# nodes on 4 simulated nodes (needs root and iproute2). Resumable (dszo sweep); needs the probes of
# benchmarks/method_tuning.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/direction_scaling.py plan
for name in ${SPECS:-scaling_bytes scaling_zo_act scaling_mezo}; do
  [ -f "sweeps/$name.yaml" ] || continue
  HF_HUB_OFFLINE=1 .venv/bin/python -m dszo sweep "sweeps/$name.yaml" --kept "benchmarks/results/sweeps/$name"
  [ $? -eq 143 ] && exit 143   # interrupted: stop here; running it again resumes
  mkdir -p "benchmarks/results/sweeps/$name" && cp runs/sweeps/$name/summary.* "benchmarks/results/sweeps/$name/" 2>/dev/null
  if [ "$name" = scaling_bytes ]; then   # the bytes a step are in the runs' metrics (3 steps each): keep them
    for run in runs/sweeps/$name/*/; do
      mkdir -p "benchmarks/results/sweeps/$name/$(basename "$run")" && cp "$run/metrics.jsonl" "$_/" 2>/dev/null
    done
  fi
done
.venv/bin/python benchmarks/direction_scaling.py report
