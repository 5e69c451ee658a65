"""Held-out evaluation, sharded across ranks: each rank scores its part, only sums are all-reduced.

Candidate tasks report accuracy and the cross-entropy over the candidate scores under `data.scoring`
(mean / sum / calibrated); generation tasks (SQuAD, DROP) decode greedily until a stop string
(`data.stop`, default a newline) or `data.max_new_tokens`, and report F1 and exact match.

Without training -- a base model (zero-shot, or in-context with `--data.num_demos k`) or a finished run folder:

    deepspeed --num_gpus 2 --module dszo evaluate --config configs/rotten_tomatoes_zo_act.yaml [--split test]
    deepspeed --num_gpus 2 --module dszo evaluate --run runs/rotten_tomatoes_zo_act [--split test]

Results go to <output_dir>/eval_base_<split>[_<k>shot].json (with --run: <run>/eval_<split>...json) and to the
console.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from dszo import comm
from dszo.assembly import build_run
from dszo.outputs import load_trained
from dszo.scoring import per_example_loss
from dszo.tasks.metrics import exact_match, f1_score


def evaluate(runtime, split, batch_size: int, gen=None) -> dict:
    """Metrics of `split` (an EncodedSplit for evaluation) under the current model. `gen` (a Generation) is
    needed for generation tasks."""
    t0 = time.perf_counter()
    batches = split.rank_batches(list(range(len(split))), comm.rank(), comm.world_size(), batch_size)
    totals = torch.zeros(3, dtype=torch.float64)  # correct (or EM), loss (or F1) sum, n
    for batch in batches:
        valid = batch.valid.double()
        if gen is not None:
            texts = gen.decode(runtime.generate(batch, gen.max_new_tokens, gen.finished))
            for text, answers, ok in zip(texts, batch.answers, batch.valid.tolist()):
                if ok:
                    totals += torch.tensor([exact_match(text, answers), f1_score(text, answers), 1.0], dtype=torch.float64)
            continue
        scores = runtime.scores(batch).cpu()
        totals[0] += float(((scores.argmax(-1) == batch.labels).double() * valid).sum())
        totals[1] += float((per_example_loss(scores, batch.labels).double() * valid).sum())
        totals[2] += float(valid.sum())
    a, b, n = runtime.all_reduce_sum(totals).tolist()
    n = max(n, 1.0)
    res = ({"exact_match": a / n, "f1": b / n} if gen is not None
           else {"accuracy": a / n, "loss": b / n, "majority_rate": majority_rate(split.labels)})
    return {**res, "num_examples": int(n), "eval_s": time.perf_counter() - t0}


def majority_rate(labels: list[int]) -> float:
    """The accuracy of always answering the split's most frequent label: what a model that learnt only the
    label prior scores. Every accuracy is reported beside it."""
    return max(labels.count(c) for c in set(labels)) / len(labels) if labels else 0.0


def headline(res: dict, before: Optional[dict] = None) -> str:
    """`accuracy 0.7200 (before training 0.5833, majority class 0.5867)`: a result is read beside what the
    untrained model scored and what always answering the most frequent label scores."""
    if "f1" in res:
        start = f" (before training F1 {before['f1']:.4f})" if before and "f1" in before else ""
        return f"F1 {res['f1']:.4f}, EM {res['exact_match']:.4f}{start}"
    beside = ([f"before training {before['accuracy']:.4f}"] if before and "accuracy" in before else []) + \
        ([f"majority class {res['majority_rate']:.4f}"] if "majority_rate" in res else [])
    return f"accuracy {res['accuracy']:.4f}" + (f" ({', '.join(beside)})" if beside else "")


def evaluate_only(cfg, run_dir: Optional[Path], split_name: str) -> dict:
    """Evaluate the base model (zero-shot / in-context) or a finished run on one split; no training."""
    run = build_run(cfg, comm.broadcast_int(cfg.seed), training=False)
    if run_dir is not None:
        load_trained(run.method, run.runtime, run_dir, cfg)
    data = run.data
    split = data.eval_split(split_name)
    res = evaluate(run.runtime, split, cfg.per_device_eval_batch_size, data.generation)
    res = {"split": split_name, "task": data.task.name, "num_demos": cfg.data.num_demos,
           "scoring": cfg.data.scoring if not data.generation else "greedy", "model": cfg.model.name_or_path,
           "run": str(run_dir) if run_dir else None, "world_size": comm.world_size(),
           "examples_per_s": res["num_examples"] / res["eval_s"], **res}
    if comm.is_main():
        out = run_dir or Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = (f"eval_{'' if run_dir else 'base_'}{split_name}" + (f"_{cfg.data.num_demos}shot" if cfg.data.num_demos
                                                                    else "") + ".json")
        (out / name).write_text(json.dumps(res, indent=2) + "\n")
        print(f"[dszo] {split_name} {headline(res)} (n={res['num_examples']}, {res['examples_per_s']:.1f} examples/s); "
              f"written to {out / name}")
    return res


if __name__ == "__main__":  # the scripts of earlier versions: say what replaced them, do not succeed silently
    import sys

    sys.exit("dszo/evaluate.py is no longer a script: run python -m dszo evaluate ... "
             "(under a launcher: deepspeed --module dszo evaluate ...)")
