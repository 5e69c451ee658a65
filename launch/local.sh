#!/usr/bin/env bash
# One node, N ranks, through DeepSpeed's launcher (CPU: gloo, one rank per --num_gpus slot; CUDA: one per GPU).
#
#   launch/local.sh N CONFIG [overrides...]        e.g. launch/local.sh 2 configs/rotten_tomatoes_zo_act.yaml --max_steps 20
#   LAUNCHER=torchrun launch/local.sh 2 CONFIG      torchrun instead of deepspeed
#   DRY_RUN=1 launch/local.sh 2 CONFIG              print the command only
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_RANKS CONFIG [--key value ...]" >&2
  exit 2
fi
N=$1; CONFIG=$2; shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.venv/bin"
[ -x "$BIN/python" ] || { echo "local.sh: no virtualenv at $ROOT/.venv; run: bash launch/setup.sh" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "local.sh: config not found: $CONFIG" >&2; exit 2; }
case "${LAUNCHER:-deepspeed}" in
  deepspeed) cmd=("$BIN/deepspeed" --num_gpus "$N" "$ROOT/dszo/train.py" --config "$CONFIG" "$@") ;;
  torchrun)  cmd=("$BIN/torchrun" --nproc_per_node "$N" "$ROOT/dszo/train.py" --config "$CONFIG" "$@") ;;
  *) echo "local.sh: LAUNCHER must be deepspeed or torchrun, got ${LAUNCHER}" >&2; exit 2 ;;
esac
if [ -n "${DRY_RUN:-}" ]; then echo "+ ${cmd[*]}"; exit 0; fi
cd "$ROOT"
exec "${cmd[@]}"
