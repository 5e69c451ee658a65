"""ZO step time and per-rank peak RSS vs plain forward passes of the same batch, for any method.

    .venv/bin/deepspeed --num_gpus 2 benchmarks/spine_step.py --config configs/rotten_tomatoes_zo_act.yaml \
        --reps 6 --out benchmarks/results/spine_step.json
    (per method: --config configs/rotten_tomatoes_<method>.yaml --out benchmarks/results/step_<method>.json)

On every rank, for the same micro-batches of the config:
  fwd2x   one plain forward (no perturbation) over the doubled batch [b; b]
  two_fwd two plain forwards over the batch b (what a two-forward ZO step contains)
  step    a full ZO step of the method (its forwards, the 3-scalar all-reduce, the update)
Peak RSS is reset (clear_refs) before each phase and read from VmHWM after it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import environment, peak_rss_mb, reset_peak_rss  # noqa: E402
from dszo import comm, launcher  # noqa: E402
from dszo.config import load_config, parse_overrides  # noqa: E402
from dszo.data import StepSampler  # noqa: E402
from dszo.assembly import build_run  # noqa: E402
from dszo.cli import fix_glibc_mmap_threshold  # noqa: E402
from dszo.zero import quantized_bytes  # noqa: E402


def timed(fn, reps):
    out = []
    for i in range(reps):
        tic = time.perf_counter()
        fn(i)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - tic)
    return out


def two_forwards(cfg) -> bool:
    return cfg.method.name in ("mezo", "agzo") or not cfg.method.functional_perturbation


def reset_peak() -> None:
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mb():
    """Peak GPU memory allocated by torch since reset_peak (None without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _summary(per_rank: list[dict], cfg) -> dict:
    """The step against the forwards it holds, medians over every rank's repetitions."""
    med = lambda k: statistics.median(x for r in per_rank for x in r[k])  # noqa: E731
    forwards = "two_fwd" if two_forwards(cfg) else "fwd2x"
    return {
        "step_median_s": med("step_s"), "fwd2x_median_s": med("fwd2x_s"), "two_fwd_median_s": med("two_fwd_s"),
        "step_over_fwd2x": med("step_s") / med("fwd2x_s"), "step_over_two_fwd": med("step_s") / med("two_fwd_s"),
        "peak_rss_step_over_forward": max(r["step_peak_rss_mb"] / r["fwd2x_peak_rss_mb"] for r in per_rank),
        # against the forwards the step holds (see share_outside_forwards)
        "peak_gpu_step_over_forward": (max(r["step_peak_gpu_mb"] / r[f"{forwards}_peak_gpu_mb"] for r in per_rank)
                                       if per_rank[0]["fwd2x_peak_gpu_mb"] else None),
        # the forwards a step holds: two over the batch (MeZO; AGZO's f0 and f+; two-forward mode), else one
        # over the doubled batch
        "share_outside_forwards": 1 - med(f"{forwards}_s") / med("step_s"),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--out", default="benchmarks/results/spine_step.json")
    p.add_argument("--local_rank", type=int, default=None)
    a, rest = p.parse_known_args()
    fix_glibc_mmap_threshold()
    launcher.map_launcher_env()
    comm.set_cpu_threads()
    over = parse_overrides(rest)
    over.setdefault("output_dir", "/tmp/dszo_bench_spine")
    over.setdefault("direction_groups", 1)   # one direction on the whole batch, against forwards of that batch
    over["overwrite_output_dir"] = True
    cfg = load_config(a.config, over)
    comm.init(cfg.ddp_timeout)
    tic = time.perf_counter()
    run = build_run(cfg, cfg.seed)
    train, method, rt = run.train_split, run.method, run.runtime
    setup_s = time.perf_counter() - tic
    world, micro = comm.world_size(), cfg.per_device_train_batch_size
    sampler = StepSampler(len(train), micro * world, cfg.seed)
    batches = [train.batch(sampler.rank_micro_batches(t, comm.rank(), world, micro, 1)[0]) for t in range(a.reps + 1)]
    res = {"setup_s": setup_s, "tokens_per_row": [int(b.attention_mask.sum(1).float().mean()) for b in batches],
           **quantized_bytes(rt.engine.module), "setup_peak_rss_mb": peak_rss_mb()}
    # Warm-up both paths (the first perturbed forward and the first update allocate their state).
    rt.forward(batches[-1].doubled())
    method.step(a.reps, [batches[-1]], cfg.learning_rate, rt)
    reset_peak()
    res["fwd2x_s"] = timed(lambda i: rt.forward(batches[i].doubled()), a.reps)
    res["fwd2x_peak_rss_mb"], res["fwd2x_peak_gpu_mb"] = peak_rss_mb(), peak_gpu_mb()
    reset_peak()
    res["two_fwd_s"] = timed(lambda i: (rt.forward(batches[i]), rt.forward(batches[i])), a.reps)
    res["two_fwd_peak_gpu_mb"] = peak_gpu_mb()
    reset_peak()
    stats = []
    res["step_s"] = timed(lambda i: stats.append(method.step(i, [batches[i]], cfg.learning_rate, rt)), a.reps)
    res["step_peak_rss_mb"], res["step_peak_gpu_mb"] = peak_rss_mb(), peak_gpu_mb()
    res["step_breakdown_s"] = {k: statistics.median(s.timings[k] for s in stats) for k in stats[0].timings}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, res)
    if comm.is_main():
        summary = _summary(per_rank, cfg)
        out = {"benchmark": "spine_step", "environment": environment(), "world_size": world,
               "threads_per_rank": torch.get_num_threads(),
               "config": {"method": dataclasses.asdict(cfg.method), "per_device_train_batch_size": micro,
                          "quantization": cfg.model.quantization,
                          "model": cfg.model.name_or_path, "reps": a.reps},
               "summary": summary, "per_rank": per_rank}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    comm.shutdown()


if __name__ == "__main__":
    main()
