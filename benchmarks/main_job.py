"""Figures of the README's main job: wall time, dev accuracy before/after, and the zero-shot accuracy of the
same prompt from the plain base model (no DeepSpeed, no adapters) for comparison.

    bash benchmarks/main_job.sh      # runs the main job under /usr/bin/time, then this script
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from dszo.config import load_config  # noqa: E402


def zero_shot_accuracy(cfg) -> dict:
    """The dev split scored by the base model as it ships: one process, plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dszo.assets import resolve_model_path
    from dszo.data import EncodedSplit, PromptEncoder
    from dszo.scoring import candidate_logits
    from dszo.tasks import get_task, load_splits

    path = resolve_model_path(cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    task = get_task(cfg.data)
    enc = PromptEncoder(AutoTokenizer.from_pretrained(path), task, cfg.data)
    dev = EncodedSplit(enc, load_splits(cfg.data, task)["dev"], "eval")
    tic, correct = time.perf_counter(), 0
    with torch.no_grad():
        for b in dev.rank_batches(list(range(len(dev))), 0, 1, 32):
            correct += int(((candidate_logits(model, b, enc.candidate_ids).argmax(-1) == b.labels) & b.valid).sum())
    return {"zero_shot_dev_accuracy": correct / len(dev), "num_examples": len(dev), "seconds": time.perf_counter() - tic}


def calibrated_zero_shot(config: str) -> dict:
    """The same prompt's zero-shot dev accuracy under calibrated scoring (each answer's log-likelihood minus its
    log-likelihood after a content-free prompt): `dszo evaluate` of the base model, one process."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "dszo", "evaluate", "--config", config, "--split", "dev",
                        "--data.scoring", "calibrated", "--output_dir", tmp], check=True, capture_output=True)
        res = json.loads((Path(tmp) / "eval_base_dev.json").read_text())
    return {"calibrated_zero_shot_dev_accuracy": res["accuracy"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/rotten_tomatoes_zo_act.yaml")
    p.add_argument("--log", required=True, help="the main job's console log (with /usr/bin/time -v output)")
    p.add_argument("--out", default="benchmarks/results/main_job.json")
    p.add_argument("--overrides", default="", help="the command-line overrides the job ran with, if any")
    a = p.parse_args()
    cfg = load_config(a.config)
    run = Path(cfg.output_dir)
    results = json.loads((run / "results.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    log = Path(a.log).read_text(errors="replace")
    wall = next((line.split(": ", 1)[1] for line in log.splitlines() if "Elapsed (wall clock)" in line), None)
    evals = [{"step": m["step"], "accuracy": m["eval_accuracy"], "loss": m["eval_loss"]} for m in metrics
             if m.get("event") == "eval"]
    steps = [m for m in metrics if "event" not in m]
    out = {
        "benchmark": "main_job", "environment": environment(),
        "command": (".venv/bin/deepspeed --num_gpus 2 dszo/train.py --config " + a.config + " " + a.overrides).strip(),
        "wall_clock_total": wall, "train_py_wall_s": results["wall_s"], "mean_step_s": results["mean_step_s"],
        "dev_accuracy_before": results["dev_accuracy_before"], "dev_accuracy_after": results["dev_accuracy_after"],
        # with load_best_model_at_end: the step of the kept (dev-best) model and the last step's dev figure
        **{k: results[k] for k in ("best_model_step", "metric_for_best_model", "dev_accuracy_last", "dev_loss_last")
           if k in results},
        # the kept model on the test split (do_predict), never used to choose anything
        **{k: results[k] for k in ("test_accuracy", "test_loss", "test_majority_rate", "test_num_examples")
           if k in results},
        "evals": evals, "train_loss_first_last": [steps[0]["loss"], steps[-1]["loss"]] if steps else None,
        "setup": next(m for m in metrics if m.get("event") == "setup"),
        "dev_majority_rate": results.get("dev_majority_rate_after"),
        **zero_shot_accuracy(cfg), **calibrated_zero_shot(a.config),
    }
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("environment", "setup")}, indent=2))


if __name__ == "__main__":
    main()
