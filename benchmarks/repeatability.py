"""20 identical 2-rank runs must give identical losses and bit-identical trained tensors (a guard against
races in gloo / ZeRO-3's coalesced gathers). Uses the tests' tiny Llama so that 20 runs take minutes.

    .venv/bin/python benchmarks/repeatability.py [--runs 20] [--steps 8]

-> benchmarks/results/repeatability.json. Run alone on the machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def tensor_digest(path: Path) -> str:
    """SHA-256 over names and bytes of every tensor (not the file: safetensors writes its metadata keys in a
    hash-map order that differs between runs)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/repeatability.json")
    args = ap.parse_args()
    from benchmarks.common import environment
    from conftest import build_tiny_model, launch, make_sentences, step_records, tiny_config

    root = REPO / "runs" / "repeatability"
    model = build_tiny_model(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_sentences(240)))
    losses, digests, tic = [], [], time.perf_counter()
    for i in range(args.runs):
        out = root / f"run{i:02d}"
        launch(tiny_config(model, data, out, max_steps=args.steps, per_device_train_batch_size=4,
                           overwrite_output_dir=True), 2)
        losses.append([(r["loss_plus"], r["loss_minus"]) for r in step_records(out)])
        digests.append(tensor_digest(out / "adapter.safetensors"))
        print(f"[repeatability] run {i + 1}/{args.runs}: {digests[-1][:16]}", file=sys.stderr)
    res = {"runs": args.runs, "steps": args.steps, "world_size": 2,
           "identical_losses": all(x == losses[0] for x in losses),
           "identical_tensors": len(set(digests)) == 1, "distinct_tensor_digests": len(set(digests)),
           "losses_first_run": losses[0], "wall_s": time.perf_counter() - tic}
    env = environment()
    env["command"] = "python " + " ".join(sys.argv)
    Path(args.out).write_text(json.dumps({"environment": env, **res}, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "losses_first_run"}, indent=1))


if __name__ == "__main__":
    main()
