"""Held-out evaluation, sharded across ranks: each rank scores its part, only sums are all-reduced.

Candidate tasks report accuracy and the cross-entropy over the candidate scores under `data.scoring`
(mean / sum / calibrated); generation tasks (SQuAD, DROP) decode greedily until a stop string
(`data.stop`, default a newline) or `data.max_new_tokens`, and report F1 and exact match.

Without training -- a base model (zero-shot, or in-context with `--data.num_demos k`) or a finished run folder:

    deepspeed --num_gpus 2 dszo/evaluate.py --config configs/rotten_tomatoes_zo_act.yaml [--split test]
    deepspeed --num_gpus 2 dszo/evaluate.py --run runs/rotten_tomatoes_zo_act [--split test]

Results go to <output_dir>/eval_base_<split>[_<k>shot].json (with --run: <run>/eval_<split>...json) and to the
console.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script by a launcher: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dszo import comm  # noqa: E402
from dszo.scoring import per_example_loss  # noqa: E402
from dszo.tasks.metrics import exact_match, f1_score  # noqa: E402


def evaluate(rt, split, batch_size: int, gen=None) -> dict:
    """Metrics of `split` (an EncodedSplit for evaluation) under the current model. `gen` (a Generation) is
    needed for generation tasks."""
    t0 = time.perf_counter()
    batches = split.rank_batches(list(range(len(split))), comm.rank(), comm.world_size(), batch_size)
    totals = torch.zeros(3, dtype=torch.float64)  # correct (or EM), loss (or F1) sum, n
    for batch in batches:
        valid = batch.valid.double()
        if gen is not None:
            texts = gen.decode(rt.generate(batch, gen.max_new_tokens, gen.finished))
            for text, answers, ok in zip(texts, batch.answers, batch.valid.tolist()):
                if ok:
                    totals += torch.tensor([exact_match(text, answers), f1_score(text, answers), 1.0], dtype=torch.float64)
            continue
        scores = rt.scores(batch).cpu()
        totals[0] += float(((scores.argmax(-1) == batch.labels).double() * valid).sum())
        totals[1] += float((per_example_loss(scores, batch.labels).double() * valid).sum())
        totals[2] += float(valid.sum())
    a, b, n = rt.all_reduce_sum(totals).tolist()
    n = max(n, 1.0)
    res = {"exact_match": a / n, "f1": b / n} if gen is not None else {"accuracy": a / n, "loss": b / n}
    return {**res, "num_examples": int(n), "eval_s": time.perf_counter() - t0}


class Generation:
    """Greedy decoding settings and the stop test: a stop string in the decoded text, or EOS."""

    def __init__(self, tokenizer, max_new_tokens: int, stop: list[str]) -> None:
        self.tok, self.max_new_tokens, self.stop = tokenizer, max_new_tokens, stop
        self.eos = tokenizer.eos_token_id

    def finished(self, tokens: list[int]) -> bool:
        if self.eos is not None and tokens[-1] == self.eos:
            return True
        text = self.tok.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in self.stop)

    def decode(self, rows: list[list[int]]) -> list[str]:
        out = []
        for tokens in rows:
            text = self.tok.decode(tokens, skip_special_tokens=True)
            for s in self.stop:
                text = text.split(s)[0]
            out.append(text.strip())
        return out


def headline(res: dict) -> str:
    if "f1" in res:
        return f"F1 {res['f1']:.4f}, EM {res['exact_match']:.4f}"
    return f"accuracy {res['accuracy']:.4f}"


def load_trained(method, rt, run_dir: Path, cfg) -> None:
    """Each rank copies its slice of every trained tensor of a finished run into its shards."""
    from safetensors import safe_open

    from dszo.config import ConfigError

    path = run_dir / method.result_file
    if not path.is_file():
        raise ConfigError(f"{path} not found: --run must name a finished run folder of method {cfg.method.name}")
    with safe_open(str(path), "pt") as f:
        meta, names = f.metadata() or {}, set(f.keys())
        if meta.get("method", cfg.method.name) != cfg.method.name:
            raise ConfigError(f"{path} was trained by method {meta['method']}, the config says {cfg.method.name}")
        for name, param in {**method.trainable(), **method.extra_state()}.items():
            if name not in names:
                raise ConfigError(f"{path} has no tensor {name}: it comes from another model or method config")
            full = f.get_tensor(name)
            shard = rt.shard(name, param)
            if tuple(full.shape) != shard.shape:
                raise ConfigError(f"{path}: {name} has shape {tuple(full.shape)}, the model's is {shard.shape}")
            shard.local.copy_(full.reshape(-1)[shard.start:shard.end].to(shard.local.dtype))


def evaluate_only(cfg, run_dir: Optional[Path], split_name: str) -> dict:
    """Evaluate the base model (zero-shot / in-context) or a finished run on one split; no training."""
    from dszo.train import build

    run_seed = comm.broadcast_int(cfg.seed)
    data, _, method, rt, _ = build(cfg, run_seed, training=False)
    if run_dir is not None:
        load_trained(method, rt, run_dir, cfg)
    split = data.eval_split(split_name)
    res = evaluate(rt, split, cfg.per_device_eval_batch_size, data.generation)
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


def main(argv=None) -> int:
    from dszo.train import run_cli

    return run_cli(argv, mode="evaluate")


if __name__ == "__main__":
    from dszo.train import _exit

    _exit(main())
