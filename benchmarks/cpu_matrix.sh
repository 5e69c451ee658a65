#!/usr/bin/env bash
# The whole test suite under each CPU kernel dispatch this machine has (ATEN_CPU_CAPABILITY) and 1 or 2
# threads per launched rank (DSZO_TEST_RANK_THREADS): a machine with AVX-512 checks what an AVX2-only or a
# scalar machine would compute (docs/numerics.md). Resumable: one JSON line per finished setting in
# benchmarks/results/cpu_matrix.jsonl; a setting already recorded for this commit is skipped.
#   bash benchmarks/cpu_matrix.sh [setting ...]     setting = <capability>:<threads>, e.g. avx2:2
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=benchmarks/results/cpu_matrix.jsonl
LOGS=benchmarks/results/cpu_matrix_logs
mkdir -p "$LOGS"
[ -x .venv/bin/python ] || { echo "cpu_matrix: no .venv here: run bash launch/setup.sh first" >&2; exit 2; }
caps=(default avx2)
grep -q avx512f /proc/cpuinfo && caps+=(avx512)
settings=("$@")
if [ ${#settings[@]} -eq 0 ]; then for c in "${caps[@]}"; do for t in 1 2; do settings+=("$c:$t"); done; done; fi
commit=$(git rev-parse --short HEAD)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
flags=$(grep -o 'avx512[a-z_0-9]*\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')
for s in "${settings[@]}"; do
  cap=${s%%:*}; threads=${s##*:}
  if [ -f "$OUT" ] && grep -q "\"commit\": \"$commit\", \"capability\": \"$cap\", \"rank_threads\": $threads," "$OUT"; then
    echo "[matrix] $s done for $commit, skipped"; continue
  fi
  log="$LOGS/${cap}_${threads}.log"
  start=$(date +%s)
  # MKL picks its own code path for the BLAS: restrict it the same way (default: its portable CNR path)
  case $cap in avx2) mkl=(MKL_ENABLE_INSTRUCTIONS=AVX2) ;; default) mkl=(MKL_CBWR=COMPATIBLE) ;; *) mkl=() ;; esac
  env "${mkl[@]}" ATEN_CPU_CAPABILITY=$cap DSZO_TEST_RANK_THREADS=$threads \
    .venv/bin/python -m pytest -q -p no:cacheprovider > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  summary=$(tail -1 "$log" | sed 's/=//g' | xargs)
  failed=$(grep -E '^(FAILED|ERROR) ' "$log" | cut -d' ' -f2 | tr '\n' ' ' | xargs)
  printf '{"commit": "%s", "capability": "%s", "rank_threads": %s, "rc": %s, "seconds": %s, "summary": "%s", "failed": "%s", "cpu": "%s", "cpu_flags": "%s", "torch": "%s"}\n' \
    "$commit" "$cap" "$threads" "$rc" "$secs" "$summary" "$failed" "$cpu" "$flags" \
    "$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null)" >> "$OUT"
  echo "[matrix] $s rc=$rc ${secs}s $summary"
done
