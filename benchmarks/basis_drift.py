"""Does ZO-Act's activation basis go stale during training? (issue 15: "basis refresh")

ZO-Act computes each adapted layer's basis V once, from the base model's input activations on the calibration
sentences. A refresh would recompute it later in training. It can only help if the recomputed basis differs from
the one in use by more than a fresh sample of sentences would make it differ anyway. This measures both, for a
finished ZO-Act run (its adapter: B and V):

  resample   |cos(V_run, V_base(F))|       the run's basis vs the base model's basis on fresh sentences F
  refresh    |cos(V_run, V_trained(F))|    ... vs the basis a refresh would compute now: the trained model
                                           (W + B Vᵀ merged into the fp32 base, whatever base the run
                                           trained on) on the same fresh sentences F
  drift      |cos(V_base(F), V_trained(F))|  what training alone changed, sentences held fixed

per adapted layer (rank r > 1: the mean squared cosine of the principal angles, ‖V₁ᵀV₂‖²_F / r, with each basis
orthonormalised). A refresh is worth building where `refresh` is well below `resample`.

    .venv/bin/python benchmarks/basis_drift.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/basis_drift.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from dszo.assets import resolve_model_path  # noqa: E402
from dszo.data import EncodedSplit, PromptEncoder, StepSampler  # noqa: E402
from dszo.export import load_run, lora_pairs  # noqa: E402
from dszo.methods import get_method  # noqa: E402
from dszo.scoring import Scorer  # noqa: E402
from dszo.subspace import orthonormalize  # noqa: E402
from dszo.tasks import get_task, load_splits  # noqa: E402
from dszo.zero import LocalRuntime  # noqa: E402

FRESH_SEED = 12345   # sentences drawn with another seed than the run's calibration set


def bases(cfg, merged: dict, sentences: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The ZO-Act bases the run's method settings compute on `sentences`, for the fp32 base model with the
    `merged` low-rank terms (module -> B Vᵀ) added to its weights; and ‖B Vᵀ‖ / ‖W‖ of each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    relative = {}
    for module, delta in merged.items():
        relative[module] = float(delta.norm() / params[f"{module}.weight"].norm())
        params[f"{module}.weight"].add_(delta)
    task = get_task(cfg.data)
    enc = PromptEncoder(AutoTokenizer.from_pretrained(path), task, cfg.data)
    train = EncodedSplit(enc, load_splits(cfg.data, task)["train"])
    method = get_method("zo_act")(cfg, run_seed=cfg.seed)
    method.attach(model)
    step = cfg.method.calibration_batch_size
    with torch.no_grad():
        method.setup(LocalRuntime(model, Scorer(enc.candidate_ids)),
                     [train.batch(sentences[i:i + step]) for i in range(0, len(sentences), step)])
    return {name: a.zo_V.detach().clone() for name, a in method.adapters.items()}, relative


def overlap(v1: torch.Tensor, v2: torch.Tensor) -> float:
    """‖Q₁ᵀQ₂‖²_F / r for orthonormal bases of the two column spaces (|cos|² at r = 1), as its square root."""
    q1, q2 = orthonormalize(v1.double()), orthonormalize(v2.double())
    return float(((q1.T @ q2).pow(2).sum() / q1.shape[1]).sqrt())


def measure(run: Path) -> dict:
    cfg, tensors = load_run(run)
    if cfg.method.name != "zo_act":
        raise SystemExit(f"{run}: a {cfg.method.name} run; the basis belongs to ZO-Act")
    pairs = lora_pairs(tensors)   # module -> (Vᵀ, B)
    v_run = {m: a.T for m, (a, _) in pairs.items()}
    n_train = len(load_splits(cfg.data, get_task(cfg.data))["train"])
    fresh = StepSampler(n_train, cfg.method.num_calibration, FRESH_SEED).global_indices(0)
    v_base, _ = bases(cfg, {}, fresh)
    v_trained, relative = bases(cfg, {m: b @ a for m, (a, b) in pairs.items()}, fresh)
    layers = {m: {"resample": overlap(v_run[m], v_base[m]), "refresh": overlap(v_run[m], v_trained[m]),
                  "drift": overlap(v_base[m], v_trained[m]),
                  "delta_rel_norm": relative[m]} for m in pairs}
    summary = {k: {"mean": statistics.fmean(x[k] for x in layers.values()), "min": min(x[k] for x in layers.values())}
               for k in ("resample", "refresh", "drift", "delta_rel_norm")}
    results = json.loads((run / "results.json").read_text())
    return {"run": str(run), "learning_rate": cfg.learning_rate, "steps": results.get("steps"),
            "rank": cfg.method.rank, "target_modules": cfg.method.target_modules,
            "dev_accuracy_after": results.get("dev_accuracy_after"), "summary": summary, "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default="benchmarks/results/basis_drift.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for run in args.runs:
        rows.append(measure(run))
        s = rows[-1]["summary"]
        print(f"{run.name}: |cos| mean (min) over layers -- resample {s['resample']['mean']:.4f} "
              f"({s['resample']['min']:.4f}), refresh {s['refresh']['mean']:.4f} ({s['refresh']['min']:.4f}), "
              f"drift {s['drift']['mean']:.6f} ({s['drift']['min']:.6f}); "
              f"|BVᵀ|/|W| {s['delta_rel_norm']['mean']:.2e}", flush=True)
    Path(args.out).write_text(json.dumps({"benchmark": "basis_drift", "environment": environment(),
                                          "fresh_sentences_seed": FRESH_SEED, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
