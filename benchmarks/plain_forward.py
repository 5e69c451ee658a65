"""The yardstick of benchmarks/cpu_step.sh: a plain forward (transformers, one process, no DeepSpeed, fp32) of
the same rows a 2-rank step of the config processes -- every rank's micro-batch of a step, doubled as the
functional-perturbation step doubles it -- padded together as one batch.

    .venv/bin/python benchmarks/plain_forward.py --config configs/rotten_tomatoes_zo_act.yaml --threads 2
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
from dszo.assembly import TaskData  # noqa: E402
from dszo.assets import resolve_model_path  # noqa: E402
from dszo.config import load_config  # noqa: E402
from dszo.data import StepSampler  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/rotten_tomatoes_zo_act.yaml")
    p.add_argument("--ranks", type=int, default=2, help="the world size whose step's rows are reproduced")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    train = TaskData(cfg).train_split()
    micro = cfg.per_device_train_batch_size
    sampler = StepSampler(len(train), micro * a.ranks, cfg.seed)
    rows = [[i for r in range(a.ranks) for i in sampler.rank_micro_batches(t, r, a.ranks, micro, 1)[0]]
            for t in range(a.reps + 1)]
    batches = [train.batch(r).doubled() for r in rows]
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                                 dtype=torch.float32).eval()
    times = []
    with torch.no_grad():
        for i, b in enumerate([batches[-1], *batches[:-1]]):
            tic = time.perf_counter()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - tic)
    out = {"benchmark": "plain_forward", "environment": environment(), "threads": a.threads,
           "rows": list(batches[0].input_ids.shape), "forward_s": times, "forward_median_s": statistics.median(times)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("threads", "rows", "forward_median_s")}))


if __name__ == "__main__":
    main()
