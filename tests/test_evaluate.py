"""Evaluation: sharded over 2 ranks it equals 1 rank, and both equal an independent single-process
reference (plain HF model, one unpadded row at a time; HF `generate` for greedy decoding). Multi-token
answers with calibrated scoring, generation with F1/EM, evaluating a finished run, training on answer rows."""
import json
import random
from pathlib import Path

import pytest
import torch

from compare import assert_steps_close, zo_act_tolerance
from conftest import NEUTRAL, NEGATIVE, POSITIVE, OTHER_KERNELS, launch, read_metrics, tiny_config
from tolerances import TINY_FORWARD_REL, loss_atol

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


def _eval(cfg, ranks, *extra, env=None):
    launch(cfg, ranks, command="evaluate", extra=list(extra), env=env)
    name = "eval_base_test.json"
    return json.loads((Path(cfg["output_dir"]) / name).read_text())


def _reference_split(cfg, split="test"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dszo.config import DataConfig
    from dszo.data import PromptEncoder
    from dszo.tasks import get_task, load_splits

    dc = DataConfig(**cfg["data"])
    task = get_task(dc)
    tok = AutoTokenizer.from_pretrained(cfg["model"]["name_or_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"]["name_or_path"], dtype=torch.float32).eval()
    return task, PromptEncoder(tok, task, dc), tok, model, load_splits(dc, task)[split]


@torch.no_grad()
def _loglik(model, ids, n):
    logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]]) for j in range(n))


def test_multi_token_calibrated_scoring_sharded_equals_reference(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path / "one", **{
        "data.candidates": [" terrible", " great great"], "data.scoring": "calibrated", "data.test_size": 21,
        "per_device_eval_batch_size": 4})
    one = _eval(cfg, 1, env=OTHER_KERNELS)
    cfg["output_dir"] = str(tmp_path / "two")
    two = _eval(cfg, 2)
    task, enc, _, model, rows = _reference_split(cfg)
    scores, labels, magnitude = [], [], 0.0
    for ex in rows:
        r = task.render(ex)
        ll = [(_loglik(model, *enc.join(r.prompt, c)), _loglik(model, *enc.join(r.null_prompt, c))) for c in r.candidates]
        scores.append([p - q for p, q in ll])
        magnitude = max(magnitude, *(abs(x) for pair in ll for x in pair))
        labels.append(r.label)
    scores, labels = torch.tensor(scores), torch.tensor(labels)
    # A score: two log-likelihoods of ≤ 2 answer tokens, 4 token log-probabilities in all, each an fp32 forward's
    # output off by ≤ loss_atol (a token's log-probability is a cross-entropy); two computations: 2×. An example
    # whose score difference is within twice that may be ranked either way; the loss (mean CE over the two
    # scores, Σ|∂CE/∂s| ≤ 2) moves by ≤ 2·score_atol.
    score_atol = 2 * 4 * loss_atol(magnitude)
    ties = int(((scores[:, 0] - scores[:, 1]).abs() < 2 * score_atol).sum())
    correct = int((scores.argmax(1) == labels).sum())
    loss = float(torch.nn.functional.cross_entropy(scores, labels))
    assert one["num_examples"] == two["num_examples"] == 21
    for res in (one, two):
        assert abs(res["accuracy"] - correct / 21) <= ties / 21
        assert abs(res["loss"] - loss) <= 2 * score_atol
    assert ties < 3  # a precondition: the accuracy check allows ±ties/21, so it must not be vacuous


def _squad_folder(path: Path) -> Path:
    """SQuAD-schema rows in the tiny model's vocabulary (its tokenizer knows only these words)."""
    rng = random.Random(1)
    words = POSITIVE + NEGATIVE + NEUTRAL
    path.mkdir()
    for split, n in (("train", 30), ("validation", 11)):
        rows = []
        for i in range(n):
            ctx = rng.sample(words, 6)
            rows.append({"id": f"{split}{i}", "title": "film", "context": " ".join(ctx), "question": "the plot was",
                         "answers": {"text": [rng.choice(ctx), " ".join(ctx[:2])], "answer_start": [0, 0]}})
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generation_sharded_equals_hf_generate(tiny_model, tmp_path):
    from dszo.tasks.metrics import exact_match, f1_score

    cfg = tiny_config(tiny_model, _squad_folder(tmp_path / "squad"), tmp_path / "one", per_device_eval_batch_size=4)
    cfg["data"] = {"task": "squad", "path": str(tmp_path / "squad"), "loss": "lm", "dev_size": 4, "test_size": 11,
                   "max_new_tokens": 3, "stop": ["moving"]}
    one = _eval(cfg, 1, env=OTHER_KERNELS)
    cfg["output_dir"] = str(tmp_path / "two")
    two = _eval(cfg, 2)
    task, enc, tok, model, rows = _reference_split(cfg)
    em = f1 = 0.0
    margin = float("inf")
    for ex in rows:
        r = task.render(ex)
        ids = torch.tensor([enc.prompt_ids(r.prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        for logits in out.scores:
            top = logits[0].topk(2).values
            margin = min(margin, float(top[0] - top[1]) / max(float(logits.abs().max()), 1.0))
        text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).split("moving")[0].strip()
        em += exact_match(text, r.answers)
        f1 += f1_score(text, r.answers)
    # Greedy decoding is exact across kernels only if no step's top-2 logits are within two computations'
    # rounding of each other: then every token, and so F1/EM, are equal.
    assert margin > 2 * 2 * TINY_FORWARD_REL, f"a greedy step is a near-tie (relative margin {margin:.1e})"
    assert one["num_examples"] == two["num_examples"] == 11
    assert one["f1"] == two["f1"] == pytest.approx(f1 / 11) and one["exact_match"] == two["exact_match"] == em / 11
    assert f1 > 0  # the check is not vacuous: some greedy answers overlap the references


def test_training_on_answer_rows_is_world_size_invariant_and_run_evaluates(tiny_model, tiny_data, tmp_path):
    """LM loss on two-token answers (rows path, doubled batch): 1 rank = 2 ranks; evaluate.py --run on the
    finished run reproduces the dev accuracy the run logged, from the saved coefficients."""
    over = {"data.candidates": [" terrible terrible", " great"], "data.loss": "lm", "max_steps": 2}
    runs = {}
    for n in (1, 2):  # the 1-rank run on the scalar kernels; the 2-rank one is re-evaluated below, exactly
        cfg = tiny_config(tiny_model, tiny_data, tmp_path / f"r{n}", per_device_train_batch_size=8 // n, **over)
        launch(cfg, n, env=OTHER_KERNELS if n == 1 else None)
        runs[n] = [r for r in read_metrics(cfg["output_dir"]) if "event" not in r]
    assert [r["num_examples"] for r in runs[1]] == [r["num_examples"] for r in runs[2]] == [8, 8]
    # Step 0 runs at B = 0, independent of the runs' bases (whose eigengaps the reference does not compute for
    # answer rows); later steps move along each run's own basis.
    tol = zo_act_tolerance(tmp_path / "r2")
    tol.assert_conditioned()
    assert_steps_close(runs[1][:1], runs[2][:1], tol)
    end = json.loads((tmp_path / "r2" / "results.json").read_text())
    launch({**cfg, "output_dir": str(tmp_path / "ignored")}, 2, command="evaluate", with_config=False,
           extra=["--run", str(tmp_path / "r2"), "--split", "dev"])
    res = json.loads((tmp_path / "r2" / "eval_dev.json").read_text())
    # Same world size, kernels and batches as the run's own evaluation: the same scores, so the same accuracy;
    # the mean loss may be summed in another order (within one fp32 loss rounding).
    assert res["accuracy"] == end["dev_accuracy_after"]
    assert abs(res["loss"] - end["dev_loss_after"]) <= loss_atol(end["dev_loss_after"])
