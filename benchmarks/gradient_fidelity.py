"""Gradient fidelity: cosine between each method's one-direction estimate and the backprop gradient.

On SmolLM2-135M and one batch of the bundled task (the first training step's 16 examples), for each method
and rank r: the method's own code (one process, dszo.zero.LocalRuntime) takes one SGD step with lr = 1 from
the same starting point, so the change of its trainable tensors is exactly its estimate ĝ; the tensors are
restored and this is repeated for `--seeds` directions (steps t = 0..seeds-1: new Z, new LOZO V -- lazy
interval 1 --, new AGZO start). The backprop gradient ∇ of the same mean loss in the same parameterisation
comes from autograd through the same wrapped model.

Reported per (method, r):
- cos_own   mean and std over seeds of cos(ĝ, ∇) in the method's own trainable space (ZO-Act: the B's);
- cos_W     the same for the effect on the adapted linear weights only, comparable across methods:
            ZO-Act's ΔW = ĝ_B Vᵀ, LOZO/AGZO/MeZO the 2-D linear weights, against ∇_W of the plain model;
- cos_mean  cos of the average of all seeds' estimates with ∇ (how fast averaging recovers the gradient).
A random direction in d dimensions has |cos| ≈ sqrt(2/(π d)); the table prints that scale for reference.

    .venv/bin/python benchmarks/gradient_fidelity.py --seeds 16 --out benchmarks/results/gradient_fidelity.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from dszo.assets import resolve_model_path  # noqa: E402
from dszo.config import load_config  # noqa: E402
from dszo.data import EncodedSplit, PromptEncoder, StepSampler  # noqa: E402
from dszo.zero import LocalRuntime  # noqa: E402
from dszo.methods import get_method  # noqa: E402
from dszo.scoring import Scorer  # noqa: E402
from dszo.tasks import get_task, load_splits  # noqa: E402

METHODS = {  # the options that make one step with lr 1 return exactly the estimate
    "mezo": {},
    "lozo": {"lazy_interval": 1},
    "agzo": {"power_iters": 3},
    "zo_act": {"basis_power_iters": 1, "basis_scale": "orthonormal"},   # the published basis, as measured
}


def build(method: str, rank: int, eps: float):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    over = {"method": {"name": method, "zo_eps": eps, **METHODS[method]}, "optim": "sgd", "weight_decay": 0.0}
    if method != "mezo":
        over["method"]["rank"] = rank
    cfg = load_config(f"configs/rotten_tomatoes_{method}.yaml", over)
    path = resolve_model_path(cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    task = get_task(cfg.data)
    enc = PromptEncoder(AutoTokenizer.from_pretrained(path), task, cfg.data)
    train = EncodedSplit(enc, load_splits(cfg.data, task)["train"])
    m = get_method(method)(cfg, run_seed=cfg.seed)
    m.attach(model)
    rt = LocalRuntime(model, Scorer(enc.candidate_ids))
    sampler = StepSampler(len(train), 16, cfg.seed)
    batch = train.batch(sampler.global_indices(0))
    calib = [train.batch(ix) for ix in _chunks(StepSampler(len(train), 64, cfg.seed).global_indices(0), 16)]
    m.setup(rt, calib if method == "zo_act" else [])
    return m, model, rt, batch


def _chunks(xs, n):
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def backprop(model, rt, batch, params: dict) -> dict:
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    loss = rt.scorer.losses(model, batch).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    return grads


def cosine(a: dict, b: dict) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in a))
    nb = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    return dot / (na * nb)


def weight_view(method: str, m, tensors: dict, linears: set[str]) -> dict:
    """The effect on the linear weights W (name -> m x n); `linears`: names of the linear layers."""
    if method == "zo_act":
        return {n.removesuffix(".zo_B"): t @ m.adapters[n.removesuffix(".zo_B")].zo_V.T for n, t in tensors.items()}
    suffix = ".weight" if method == "mezo" else ".base.weight"
    return {n.removesuffix(suffix): t for n, t in tensors.items() if n.removesuffix(suffix) in linears}


def run(method: str, rank: int, seeds: int, eps: float) -> dict:
    tic = time.perf_counter()
    m, model, rt, batch = build(method, rank, eps)
    params = m.trainable()
    head = model.get_output_embeddings()
    linears = {n.removesuffix(".base") for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head}
    # ∇ in the method's space; ∇_W of the linear weights (ZO-Act: of the frozen W through the same forward)
    grad_own = backprop(model, rt, batch, params)
    if method == "zo_act":
        weights = {n: a.base.weight for n, a in m.adapters.items()}
        grad_w = backprop(model, rt, batch, weights)
    else:
        grad_w = weight_view(method, m, grad_own, linears)
    start = {n: p.detach().clone() for n, p in params.items()}
    cos_own, cos_w, total = [], [], {n: torch.zeros_like(p) for n, p in start.items()}
    for t in range(seeds):
        m.step(t, [batch], 1.0, rt)
        est = {n: start[n] - p.detach() for n, p in params.items()}
        for n, p in params.items():
            p.data.copy_(start[n])
            total[n] += est[n] / seeds
        cos_own.append(cosine(est, grad_own))
        cos_w.append(cosine(weight_view(method, m, est, linears), grad_w))
    d_own = sum(p.numel() for p in start.values())
    d_w = sum(g.numel() for g in grad_w.values())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    std = lambda xs: math.sqrt(sum((x - mean(xs)) ** 2 for x in xs) / max(1, len(xs) - 1))  # noqa: E731
    return {"method": method, "rank": None if method == "mezo" else rank, "seeds": seeds, "zo_eps": eps,
            "dim_own": d_own, "dim_W": d_w,
            "cos_own_mean": mean(cos_own), "cos_own_std": std(cos_own), "cos_own_abs_mean": mean([abs(c) for c in cos_own]),
            "cos_W_mean": mean(cos_w), "cos_W_std": std(cos_w), "cos_W_abs_mean": mean([abs(c) for c in cos_w]),
            "cos_mean_estimate": cosine(total, grad_own), "random_abs_cos_own": math.sqrt(2 / (math.pi * d_own)),
            "cos_own": cos_own, "cos_W": cos_w, "seconds": time.perf_counter() - tic}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--methods", nargs="+", default=["zo_act", "agzo", "lozo", "mezo"])
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--out", default="benchmarks/results/gradient_fidelity.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for method in args.methods:
        for rank in ([1] if method == "mezo" else args.ranks):
            rows.append(run(method, rank, args.seeds, args.eps))
            r = rows[-1]
            print(f"{method:7} r={str(r['rank']):4} cos_own {r['cos_own_mean']:+.4f}±{r['cos_own_std']:.4f} "
                  f"|cos_own| {r['cos_own_abs_mean']:.4f} (random {r['random_abs_cos_own']:.5f}, d={r['dim_own']}) "
                  f"cos_W {r['cos_W_mean']:+.4f} |cos_W| {r['cos_W_abs_mean']:.4f} mean-of-{args.seeds} "
                  f"{r['cos_mean_estimate']:+.4f}  ({r['seconds']:.0f}s)", flush=True)
            Path(args.out).write_text(json.dumps({"environment": environment(), "batch": "first step's 16 examples",
                                                  "results": rows}, indent=1))


if __name__ == "__main__":
    main()
