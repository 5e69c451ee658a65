# Sourced by the sbatch scripts: the job's hosts, its run folder and a `run` that honours DRY_RUN=1.
# Inputs: CONFIG, GPUS_PER_NODE, RUN_DIR, VENV (defaults below); Slurm's SLURM_JOB_NODELIST / SLURM_JOB_ID.
set -euo pipefail
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$REPO"
VENV="${VENV:-$REPO/.venv}"
CONFIG="${CONFIG:-configs/rotten_tomatoes_zo_act.yaml}"
MASTER_PORT="${MASTER_PORT:-29500}"
JOB="${SLURM_JOB_NAME:-dszo}-${SLURM_JOB_ID:-local}"
RUN_DIR="${RUN_DIR:-runs/$JOB}"
: "${SLURM_JOB_NODELIST:?run this under sbatch (or set SLURM_JOB_NODELIST for a dry run)}"

run() { if [ -n "${DRY_RUN:-}" ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }

# One hostname per line: scontrol where Slurm is installed, dszo's own expansion elsewhere (dry runs).
if command -v scontrol > /dev/null 2>&1; then
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  mapfile -t HOSTS < <("$VENV/bin/python" -m dszo.launcher hostnames "$SLURM_JOB_NODELIST")
fi
NNODES=${#HOSTS[@]}
MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
mkdir -p "$RUN_DIR"
HOSTFILE="$RUN_DIR/hostfile"
for h in "${HOSTS[@]}"; do echo "$h slots=$GPUS_PER_NODE"; done > "$HOSTFILE"
cp "$CONFIG" "$RUN_DIR/submitted_config.yaml"   # train.py writes the resolved config.yaml next to it
echo "[dszo] job $JOB: $NNODES node(s) x $GPUS_PER_NODE rank(s), master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR" >&2
