"""The cost of a direction: drawing Z over N elements, and drawing + applying it (θ += εZ), against torch.randn of
the same size -- dszo's counter-based generator (dszo/directions.py), and the chunked host generator it replaced
(one torch.Generator per 16,384-element chunk, copied here as the baseline). On CPU with 1 and 2 threads, and on
CUDA where there is one (there the old generator also pays the host-to-device copy).

    .venv/bin/python benchmarks/directions.py [--numel 100000000] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from dszo.directions import gaussian, mix, tensor_key  # noqa: E402

OLD_CHUNK = 1 << 14


def chunked_host_gaussian(seed: int, key: int, start: int, end: int, device=None) -> torch.Tensor:
    """The generator of dszo before issue 14: one torch.Generator per chunk, drawn on the host, then copied."""
    first, last = start // OLD_CHUNK, (end - 1) // OLD_CHUNK
    gen, parts = torch.Generator(), []
    for c in range(first, last + 1):
        gen.manual_seed(mix(seed, key, c))
        parts.append(torch.randn(OLD_CHUNK, generator=gen))
    flat = torch.cat(parts)
    return flat[start - first * OLD_CHUNK:end - first * OLD_CHUNK].to(device=device)


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of `reps` calls after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure(numel: int, reps: int, device: torch.device) -> dict:
    key, theta = tensor_key("layer.weight"), torch.zeros(numel, device=device)
    cases = {
        "torch_randn_s": lambda: torch.randn(numel, device=device),
        "counter_draw_s": lambda: gaussian(7, key, 0, numel, device=device),
        "counter_draw_apply_s": lambda: theta.add_(gaussian(7, key, 0, numel, device=device), alpha=1e-3),
        "chunked_host_draw_s": lambda: chunked_host_gaussian(7, key, 0, numel, device=device),
        "chunked_host_draw_apply_s": lambda: theta.add_(chunked_host_gaussian(7, key, 0, numel, device=device),
                                                        alpha=1e-3),
    }
    out = {name: timed(fn, reps, device) for name, fn in cases.items()}
    out["counter_vs_randn"] = out["counter_draw_s"] / out["torch_randn_s"]
    out["counter_vs_chunked_host"] = out["counter_draw_s"] / out["chunked_host_draw_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--numel", type=int, default=100_000_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cpu_numel", type=int, default=None, help="elements for the CPU cases (default: --numel)")
    p.add_argument("--out", default="benchmarks/results/directions.json")
    a = p.parse_args()
    cpu_numel = a.cpu_numel or a.numel
    results = {"environment": environment(), "numel": a.numel, "cpu_numel": cpu_numel, "reps": a.reps, "runs": {}}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results["runs"][f"cpu_{threads}_threads"] = measure(cpu_numel, a.reps, torch.device("cpu"))
        print(f"[directions] cpu {threads} threads: {results['runs'][f'cpu_{threads}_threads']}", flush=True)
    if torch.cuda.is_available():
        results["runs"]["cuda"] = measure(a.numel, a.reps, torch.device("cuda"))
        print(f"[directions] cuda: {results['runs']['cuda']}", flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"[directions] written to {a.out}")


if __name__ == "__main__":
    main()
