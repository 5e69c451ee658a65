"""load_best_model_at_end (dszo/best.py): the kept model is the one a run stopped at the dev-best step would have
trained, its checkpoint survives pruning, a resumed run keeps the best it had seen, and results.json says which step
it is. The reference for "the model at step b" is an independent run with max_steps = b (I4: same ranks, kernels
and a constant rate give the same trajectory), not the trainer's own bookkeeping."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import launch, load_adapter, read_metrics, tiny_config
from dszo.best import BestModel, greater_is_better

STEPS, EVAL = 12, 3


def test_greater_is_better_follows_hf_when_unset():
    assert greater_is_better("accuracy", None) and greater_is_better("eval_f1", None)
    assert not greater_is_better("loss", None) and not greater_is_better("eval_loss", None)
    assert greater_is_better("loss", True) and not greater_is_better("accuracy", False)


def test_best_keeps_the_earlier_of_ties_and_round_trips_through_a_checkpoint():
    best = BestModel("eval_accuracy", None)
    for step, acc in [(3, 0.5), (6, 0.7), (9, 0.7), (12, 0.6)]:
        if best.improves({"accuracy": acc, "loss": 1.0}):
            best.keep(step, {"accuracy": acc, "loss": 1.0, "eval_s": 0.1})
    assert (best.step, best.value, best.result) == (6, 0.7, {"accuracy": 0.7, "loss": 1.0})
    again = BestModel("accuracy", None)
    again.load_state_dict(json.loads(json.dumps(best.state_dict())))
    assert (again.step, again.value) == (6, 0.7)
    assert not best.improves({"accuracy": float("nan")})     # a diverged evaluation is never the best
    other = BestModel("loss", None)          # a checkpoint that chose by another metric does not carry over
    other.load_state_dict(best.state_dict())
    assert other.step is None


def _dev_evals(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out) if r.get("event") == "eval"}


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_adapter(a), load_adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.multirank
@pytest.mark.slow
def test_the_kept_model_is_the_model_of_the_dev_best_step(tiny_model, tiny_data, tmp_path):
    # at this rate the tiny run's dev loss is lowest early and then rises: the best model is loaded back
    over = {"max_steps": STEPS, "eval_steps": EVAL, "save_steps": EVAL, "save_total_limit": 2, "ddp_timeout": 60,
            "per_device_train_batch_size": 4, "do_predict": True, "learning_rate": 5e-2,
            "load_best_model_at_end": True, "metric_for_best_model": "eval_loss"}
    run = tmp_path / "run"
    proc = launch(tiny_config(tiny_model, tiny_data, run, **over), 2)
    evals = _dev_evals(run)
    during = [s for s in sorted(evals) if s > 0]
    assert during == list(range(EVAL, STEPS + 1, EVAL))
    best = min(during, key=lambda s: (evals[s]["eval_loss"], s))       # the earliest of ties
    assert best < STEPS - EVAL, f"the tiny run's dev loss should rise after an early low: {evals}"
    res = json.loads((run / "results.json").read_text())
    assert res["best_model_step"] == best and res["metric_for_best_model"] == "loss"
    assert res["dev_loss_after"] == evals[best]["eval_loss"] and res["dev_loss_last"] == evals[STEPS]["eval_loss"]
    assert f"(the dev-best model, step {best})" in proc.stdout + proc.stderr
    tests = [r for r in read_metrics(run) if r.get("event") == "test"]
    assert [(r["step"], r.get("model_step")) for r in tests] == [(STEPS, best)]   # which model the test split saw
    # save_total_limit 2 keeps the newest two checkpoints and, beside them, the best one
    assert {p.name for p in run.glob("checkpoint-*")} == {f"checkpoint-{s}" for s in (best, STEPS - EVAL, STEPS)}

    short = tmp_path / "short"
    launch(tiny_config(tiny_model, tiny_data, short, **{**over, "max_steps": best, "load_best_model_at_end": False}), 2)
    _same_tensors(run, short)
    ref = json.loads((short / "results.json").read_text())
    assert res["test_accuracy"] == ref["test_accuracy"] and res["test_loss"] == ref["test_loss"]

    # the seed-replay log rebuilds the kept model: by default up to the step the run kept
    launch({"output_dir": str(tmp_path / "replay_cfg")}, 2, command="replay", with_config=False,
           extra=["--run", str(run)])
    _same_tensors(run, run / "replayed")

    # resumed after the best step, the run still knows which step was best (the trainer's checkpointed state)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("adapter.safetensors", "results.json"))
    launch(tiny_config(tiny_model, tiny_data, resumed,
                       **{**over, "resume_from_checkpoint": str(resumed / f"checkpoint-{STEPS - EVAL}")}), 2)
    assert json.loads((resumed / "results.json").read_text())["best_model_step"] == best
    _same_tensors(run, resumed)

    # resumed from a checkpoint whose best was pruned since, the run says so and keeps its last step
    lost = tmp_path / "lost"
    shutil.copytree(run, lost, ignore=shutil.ignore_patterns("adapter.safetensors", "results.json"))
    shutil.rmtree(lost / f"checkpoint-{best}")
    proc = launch(tiny_config(tiny_model, tiny_data, lost,
                              **{**over, "resume_from_checkpoint": str(lost / f"checkpoint-{STEPS - EVAL}")}), 2)
    assert f"checkpoint {lost / f'checkpoint-{best}'} is gone" in proc.stdout + proc.stderr
    assert json.loads((lost / "results.json").read_text())["best_model_step"] == STEPS

    # greater_is_better turns the choice round: the highest dev loss, on this run the last evaluation -- kept as it is,
    # nothing loaded back
    worst = max(during, key=lambda s: (evals[s]["eval_loss"], -s))
    assert worst == STEPS, evals
    last = tmp_path / "last"
    launch(tiny_config(tiny_model, tiny_data, last, **{**over, "greater_is_better": True}), 2)
    res_last = json.loads((last / "results.json").read_text())
    assert res_last["best_model_step"] == STEPS and "dev_loss_last" not in res_last
    _same_tensors(last, lost)          # both kept step 12's model: the same trajectory, resumed or not
