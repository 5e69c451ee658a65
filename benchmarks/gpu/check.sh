#!/usr/bin/env bash
# The GPU check of issue 14, in one go on one H100/H200 (the device machine has no package registry). Writes its
# results under ${OUT:-benchmarks/results/gpu}; about 8 minutes.
#   here, once (needs a registry and the bundled model):  bash benchmarks/gpu/check.sh --prepare
#       -> benchmarks/gpu/wheels/ (DeepSpeed built from its sdist, and its dependencies the device image lacks),
#          the bundled tokenizer next to the shapes, benchmarks/gpu/data.jsonl (long synthetic rows)
#   there (carry benchmarks/gpu/wheels, benchmarks/gpu/shapes, benchmarks/gpu/data.jsonl), in two calls that each
#   fit the device tool's 10 minutes:
#       PART=small bash benchmarks/gpu/check.sh    # directions, every method on the 1B shape   (~4 min)
#       PART=large bash benchmarks/gpu/check.sh    # ZO-Act and MeZO at 8B, MeZO at 13B         (~6 min)
#   on CPU, to check the script itself (tiny shape, CPU DeepSpeed config): GPU_CHECK_SMOKE=1 bash benchmarks/gpu/check.sh
# What it measures:
# 1. directions drawn on the GPU equal the CPU's (tests/test_directions.py), and their speed (benchmarks/directions.py);
# 2. per shape (random weights, bf16 base, ZeRO-3 on one GPU, ds_configs/zero3_gpu.json) and method: the step, a plain
#    forward of the doubled batch and of the batch twice, peak memory (benchmarks/spine_step.py).
# ds_configs/zero3_gpu.json holds DeepSpeed's usual GPU prefetch/reuse values until this check has measured them. A
# ZO-Act step on an nf4 base needs real weights (bitsandbytes quantizes while loading) and is not part of it.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
HERE=benchmarks/gpu
if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p "$HERE/wheels"
  .venv/bin/pip wheel -q --no-deps -w "$HERE/wheels" deepspeed==0.19.8 hjson
  # the device image runs Python 3.12 (KINDS.md): binary wheels for it
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d "$HERE/wheels" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0
  model=$(.venv/bin/python -c "from dszo.assets import resolve_model_path; print(resolve_model_path('bundled'))")
  cp "$model"/tokenizer* "$model"/chat_template.jinja "$HERE/shapes/"
  .venv/bin/python - <<'PY'
import json, random
rng = random.Random(0)
words = "the film movie plot story cast acting scene music very quite rather and but this that good bad dull " \
        "brilliant boring moving tedious charming clumsy witty".split()
rows = [{"sentence": " ".join(rng.choice(words) for _ in range(120)), "label": rng.choice(["rotten", "fresh"])}
        for _ in range(600)]
open("benchmarks/gpu/data.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
  du -sh "$HERE/wheels" "$HERE/shapes" "$HERE/data.jsonl"
  exit 0
fi
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
if [ "$SMOKE" = 1 ]; then PY=.venv/bin/python; fi
PART="${PART:-all}"
if [ "$SMOKE" != 1 ] && [ -d "$HERE/wheels" ]; then
  "$PY" -m pip install -q --no-deps --no-index "$HERE"/wheels/*.whl > "$OUT/pip.log" 2>&1
  echo "[gpu] wheels rc=$?"; "$PY" -m pip check >> "$OUT/pip.log" 2>&1; echo "[gpu] pip check rc=$?"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - > "$OUT/environment.json" <<'PY'
import json, torch, transformers
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY
if [ "$PART" != large ]; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_directions.py tests/test_directions_triton.py > "$OUT/test_directions.log" 2>&1
  echo "[gpu] test_directions rc=$?"
  numel=100000000; [ "$SMOKE" = 1 ] && numel=100000
  timeout -k 10 120 "$PY" benchmarks/directions.py --numel $numel --cpu_numel 1000000 --out "$OUT/directions.json" \
    > "$OUT/directions.log" 2>&1
  echo "[gpu] directions rc=$?"
fi
ds=ds_configs/zero3_gpu.json; dtype=bfloat16; [ "$SMOKE" = 1 ] && { ds=ds_configs/zero3_cpu.json; dtype=float32; }
step() {  # shape method reps seconds
  local shape=$1 method=$2 name=$1; [ "$SMOKE" = 1 ] && shape=tiny-llama
  timeout -k 10 "$4" "$PY" benchmarks/spine_step.py --config "configs/rotten_tomatoes_$method.yaml" --reps "$3" \
    --out "$OUT/step_${name}_${method}.json" --model.name_or_path "random:$HERE/shapes/$shape.json" \
    --model.quantization none --model.dtype $dtype --deepspeed $ds --per_device_train_batch_size 16 \
    --data.task jsonl --data.path "$HERE/data.jsonl" --data.max_length 128 --data.train_size 256 \
    --data.dev_size 16 --data.test_size 16 > "$OUT/step_${name}_${method}.log" 2>&1
  echo "[gpu] $name $method rc=$?"
}
if [ "$PART" != large ]; then
  for m in zo_act mezo lozo agzo; do step llama-3.2-1b "$m" 5 60; done
fi
if [ "$PART" != small ]; then
  step llama-3-8b zo_act 3 150
  step llama-3-8b mezo 2 180
  step opt-13b mezo 2 200
fi
echo "[gpu] done: $OUT"
