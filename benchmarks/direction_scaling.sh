#!/usr/bin/env bash
# The scaling study of issue 16: ZO-Act and MeZO at their tuned learning rates on 1, 2 and 4 simulated nodes,
# data parallelism (batch x N) vs direction parallelism (directions x N), the same steps. Resumable (dszo sweep);
# needs the probes of benchmarks/method_tuning.sh, root and iproute2 (launch/sim_cluster.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/direction_scaling.py plan
for spec in sweeps/scaling_*_n*.yaml; do
  HF_HUB_OFFLINE=1 .venv/bin/python -m dszo sweep "$spec"
  name=$(basename "$spec" .yaml)
  mkdir -p "benchmarks/results/sweeps/$name" && cp runs/sweeps/$name/summary.* "benchmarks/results/sweeps/$name/" 2>/dev/null
done
.venv/bin/python benchmarks/direction_scaling.py report
