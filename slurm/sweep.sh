#!/usr/bin/env bash
# Submit the same run at several node counts (a scaling study): one job per count, run folders
# runs/<SWEEP>/nodes<N>. Settings: NODE_COUNTS (default "1 2 4 8"), SWEEP (name), SCRIPT (sbatch file),
# CONFIG, GPUS_PER_NODE, EXTRA_ARGS. DRY_RUN=1 prints the sbatch commands instead of submitting.
#   CONFIG=configs/rotten_tomatoes_zo_act.yaml slurm/sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT="${SCRIPT:-slurm/dszo.sbatch}"
SWEEP="${SWEEP:-scale-$(date +%Y%m%d-%H%M%S)}"
mkdir -p logs
for n in ${NODE_COUNTS:-1 2 4 8}; do
  cmd=(sbatch --nodes "$n" --job-name "dszo-$SWEEP-n$n" --output "logs/%x-%j.out"
       --export "ALL,RUN_DIR=runs/$SWEEP/nodes$n,CONFIG=${CONFIG:-configs/rotten_tomatoes_zo_act.yaml}" "$SCRIPT")
  if [ -n "${DRY_RUN:-}" ]; then printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'; else "${cmd[@]}"; fi
done
