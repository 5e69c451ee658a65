"""The dev-best model, kept (HF TrainingArguments' load_best_model_at_end / metric_for_best_model /
greater_is_better).

A zeroth-order run's dev curve is not monotone: at a rate that learns fast the dev loss can be lowest part-way and
then drift up (benchmarks/results/main_job_fp32.json: dev accuracy 0.727 at step 100, 0.683 at 300). With
load_best_model_at_end, as in HF, a dev evaluation that beats every earlier one saves a checkpoint
(`checkpoint-<step>/`, resumable like any other), which pruning by save_total_limit leaves in place for as long as it
is the best; at the end
the trainer loads it back, so that the test split, `adapter.safetensors` and results.json describe the kept model,
and results.json says which step it came from and what the last step scored beside it. The candidates are the
evaluations during training and the one at max_steps, not the untrained model (as in HF). The test split never
chooses.
"""
from __future__ import annotations

import math
from typing import Optional


def metrics_of(task_kind: str) -> tuple[str, ...]:
    """What a dev evaluation of this kind of task reports (dszo/evaluate.py)."""
    return ("f1", "exact_match") if task_kind == "generation" else ("loss", "accuracy")


def metric_name(name: str) -> str:
    """HF accepts `eval_loss` and `loss` alike."""
    return name.removeprefix("eval_")


def greater_is_better(name: str, given: Optional[bool]) -> bool:
    """HF's rule when unset: greater is better unless the metric is a loss."""
    return given if given is not None else not metric_name(name).endswith("loss")


class BestModel:
    """Which dev evaluation was best so far; checkpointed with the trainer's state so that a resumed run keeps it."""

    def __init__(self, metric: str, greater: Optional[bool]) -> None:
        self.metric = metric_name(metric)
        self.greater = greater_is_better(metric, greater)
        self.step: Optional[int] = None
        self.result: Optional[dict] = None   # the best evaluation's figures

    @property
    def value(self) -> Optional[float]:
        return None if self.result is None else float(self.result[self.metric])

    def improves(self, result: dict) -> bool:
        """Whether this evaluation beats the best so far (ties keep the earlier, shorter-trained model; a
        non-finite one, from a diverged model, never does)."""
        value = float(result[self.metric])
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.greater else value < self.value

    def keep(self, step: int, result: dict) -> None:
        self.step, self.result = step, {k: v for k, v in result.items() if k != "eval_s"}

    def summary(self, last_step: int, last: dict) -> dict:
        """results.json's fields: which step the kept model comes from and, where it is not the last, the last
        evaluation's figures beside it."""
        out = {"best_model_step": self.step, "metric_for_best_model": self.metric}
        if self.step != last_step:
            out.update({f"dev_{k}_last": v for k, v in last.items() if k != "eval_s"})
        return out

    def state_dict(self) -> dict:
        return {"metric": self.metric, "greater": self.greater, "step": self.step, "result": self.result}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """A resumed run that chooses by another metric (or direction) starts choosing afresh from the resume step."""
        if state and state.get("metric") == self.metric and state.get("greater") == self.greater:
            self.step, self.result = state["step"], state["result"]
