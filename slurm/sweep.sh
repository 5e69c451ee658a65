#!/usr/bin/env bash
# Submit the same run at several node counts (a scaling study): one job per count and mode, run folders
# runs/<SWEEP>/nodes<N> (data parallelism: the global batch grows with N) and, with MODES="data directions",
# runs/<SWEEP>/nodes<N>-directions (direction parallelism: --direction_groups N, each node measures its own
# direction on its own examples; benchmarks/direction_scaling.py report --runs runs/<SWEEP> compares them).
# Settings: NODE_COUNTS (default "1 2 4 8"), MODES (default "data"), SWEEP (name), SCRIPT (sbatch file), CONFIG,
# GPUS_PER_NODE, EXTRA_ARGS (dszo overrides for every job). DRY_RUN=1 prints the sbatch commands instead.
#   CONFIG=configs/rotten_tomatoes_zo_act.yaml slurm/sweep.sh
#   MODES="data directions" NODE_COUNTS="1 2 4" SWEEP=scaling slurm/sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT="${SCRIPT:-slurm/dszo.sbatch}"
SWEEP="${SWEEP:-scale-$(date +%Y%m%d-%H%M%S)}"
mkdir -p logs
for n in ${NODE_COUNTS:-1 2 4 8}; do
  for mode in ${MODES:-data}; do
    case "$mode" in
      data) dir="nodes$n"; extra="${EXTRA_ARGS:-}" ;;
      directions) [ "$n" -gt 1 ] || continue   # one node: the data run is the same run
                  dir="nodes$n-directions"; extra="${EXTRA_ARGS:-} --direction_groups $n --partition node" ;;
      *) echo "slurm/sweep.sh: MODES has '$mode'; use data and/or directions" >&2; exit 2 ;;
    esac
    # EXTRA_ARGS reaches the job through the environment (--export ALL): sbatch's list would split it at commas
    cmd=(env "EXTRA_ARGS=$extra" sbatch --nodes "$n" --job-name "dszo-$SWEEP-$dir" --output "logs/%x-%j.out"
         --export "ALL,RUN_DIR=runs/$SWEEP/$dir,CONFIG=${CONFIG:-configs/rotten_tomatoes_zo_act.yaml}" "$SCRIPT")
    if [ -n "${DRY_RUN:-}" ]; then printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'; else "${cmd[@]}"; fi
  done
done
