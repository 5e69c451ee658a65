"""Pinned end-to-end runs: every method on the tiny model, 2 ranks, 3 steps, recorded once as a golden file.

The golden file (tests/golden/golden_runs.json) holds each run's per-step losses and projected gradients (as
exact floats) and a SHA-256 of every trained tensor it wrote. tests/test_golden.py runs the same cases again:
on the host and software that wrote the file (its fingerprint: CPU, kernels, library versions, the tiny
model's bytes) every number must be bit-identical -- the proof that a refactoring changed nothing (issue 13:
the file of commit 47c17cc, recorded before the restructuring, matched it bit for bit). Re-recorded only when
the numbers are meant to change (issue 14: directions from a counter-based generator).
On another host only what rounding cannot change is compared (docs/numerics.md): the first step's losses
within their derived bound.

    .venv/bin/python tests/golden_runs.py --write      # re-record (only when behaviour is meant to change)
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden" / "golden_runs.json"
# Pinned kernels and one thread per rank: the most portable setting (conftest.OTHER_KERNELS).
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
RANKS, STEPS = 2, 3

# name -> overrides of conftest.tiny_config: every method, and the paths a step can take (two forwards instead of
# the doubled batch, several directions, momentum and linear decay, LOZO's redraw of V at step 2, a 4-bit base).
CASES = {
    "zo_act": {},
    "zo_act_two_forwards": {"method.functional_perturbation": False, "method.num_directions": 2,
                            "optim": "momentum", "lr_scheduler_type": "linear"},
    "zo_act_nf4": {"model.quantization": "nf4"},
    "lozo": {"method": {"name": "lozo", "lazy_interval": 2}, "optim": "sgd", "learning_rate": 1e-3},
    "lozo_m": {"method": {"name": "lozo_m", "lazy_interval": 2, "functional_perturbation": False},
               "optim": "sgd", "learning_rate": 1e-3},
    "agzo": {"method": {"name": "agzo", "num_directions": 2}, "optim": "sgd", "learning_rate": 1e-3},
    "mezo": {"method": {"name": "mezo"}, "optim": "sgd", "learning_rate": 1e-3, "weight_decay": 0.01},
    "first_order_zo_act": {"method": {"name": "first_order", "rank": 2, "num_calibration": 16,
                                      "calibration_batch_size": 4, "basis_oversample": 64,
                                      "basis_scale": "orthonormal"},   # as tiny_config's zo_act
                           "optim": "momentum", "learning_rate": 0.1},
    "first_order_full": {"method": {"name": "first_order", "parameterization": "full",
                                    "trainable": ["*norm*", "*q_proj*"]}, "learning_rate": 1e-3},
}
STEP_KEYS = ("loss", "loss_plus", "loss_minus", "proj_grads")


def case_config(name: str, model: Path, data: Path, out: Path) -> dict:
    from conftest import tiny_config

    over = dict(CASES[name])
    cfg = tiny_config(model, data, out, max_steps=STEPS, per_device_train_batch_size=4, eval_before_training=False,
                      **{k: v for k, v in over.items() if k != "method"})
    if "method" in over:
        cfg["method"] = dict(over["method"])
    return cfg


def run_case(name: str, model: Path, data: Path, root: Path) -> dict:
    """Launch one case and read back what the golden file records of it."""
    from conftest import launch
    from safetensors.torch import load_file

    out = root / name
    launch(case_config(name, model, data, out), RANKS, env=PINNED_ENV)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [{k: r[k] for k in STEP_KEYS if k in r} for r in records if "event" not in r]
    result = next(p for p in sorted(out.glob("*.safetensors")))
    tensors = load_file(str(result))
    return {"steps": steps, "result_file": result.name,
            "tensors": {k: _digest(v) for k, v in sorted(tensors.items())}}


def _digest(t) -> str:
    return hashlib.sha256(t.contiguous().view(-1).numpy().tobytes()).hexdigest()


def fingerprint(model: Path) -> dict:
    """What must match for bit-identical numbers: the CPU and its features, the libraries, the model's bytes."""
    import deepspeed
    import torch
    import transformers

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
        cpu += " | " + " ".join(sorted({f for f in info.split() if f.startswith(("avx", "fma", "amx"))}))
    weights = sorted(model.glob("*.safetensors"))
    return {"cpu": cpu, "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "model_sha256": hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest(), "env": PINNED_ENV}


def write(root: Path) -> None:
    from conftest import build_tiny_model, make_sentences

    model = build_tiny_model(root / "tiny_model")
    data = root / "sentiment.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_sentences(240)))
    runs = {}
    for name in CASES:
        runs[name] = run_case(name, model, data, root / "runs")
        print(f"[golden] {name}: {len(runs[name]['steps'])} steps, {len(runs[name]['tensors'])} tensors", flush=True)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"fingerprint": fingerprint(model), "runs": runs}, indent=1) + "\n")
    print(f"[golden] written to {GOLDEN}")


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
