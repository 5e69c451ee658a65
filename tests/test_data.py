"""Data: bundled task, file loading errors with file:line, splits, world-size-invariant sampling, padding."""
import json

import pytest
import torch

from dszo.config import DataConfig
from dszo.data import EncodedSplit, PromptEncoder, StepSampler
from dszo.tasks import DataError, get_task, load_splits, split


def load_examples(cfg):
    """Every row of a one-file task, checked (the dev/test sizes are set to 0 so that nothing is held out)."""
    cfg.dev_size = cfg.test_size = 0
    return load_splits(cfg, get_task(cfg))["train"]


def test_step_sampler_is_world_size_invariant():
    s = StepSampler(n=50, global_batch=12, seed=3)
    for t in range(10):  # crosses epoch boundaries
        g = s.global_indices(t)
        assert len(g) == 12
        for world, micro, accum in ((1, 12, 1), (2, 6, 1), (2, 3, 2), (4, 3, 1)):
            parts = [i for r in range(world) for mb in s.rank_micro_batches(t, r, world, micro, accum) for i in mb]
            assert parts == g
    seen = [i for t in range(50 // 12 * 12 // 12) for i in s.global_indices(t)]
    assert len(set(seen)) == len(seen)  # no repeats within an epoch


def test_splits_are_fixed_and_disjoint():
    ex = list(range(100))
    a, b = split(ex, 10, 20, seed=0), split(ex, 10, 20, seed=0)
    assert a == b
    assert len(a["dev"]) == 10 and len(a["test"]) == 20 and len(a["train"]) == 70
    assert not set(a["dev"]) & set(a["train"])
    with pytest.raises(DataError, match="leaves no training examples"):
        split(ex, 50, 50, seed=0)


def _jsonl(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return DataConfig(task="jsonl", path=str(p))


@pytest.mark.parametrize("rows,match", [
    ([{"sentence": "good", "label": "fresh"}, "{broken"], r"d.jsonl:2: not valid JSON"),
    ([{"sentence": "good", "label": "fresh"}, {"sentence": "bad"}], r"d.jsonl:2: missing field 'label'"),
    ([{"sentence": "good", "label": "meh"}], r"d.jsonl:1: unknown label 'meh'"),
    ([{"text": "good", "label": "fresh"}], r"d.jsonl:1: missing field 'sentence'"),
    ([], r"no examples found"),
    ([{"sentence": "good", "label": "fresh"}, ["a", "list"]], r"d.jsonl:2: expected a JSON object, got list"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        load_examples(_jsonl(tmp_path, rows))


def test_missing_file():
    with pytest.raises(DataError, match="data.path not found"):
        load_examples(DataConfig(task="jsonl", path="/nope.jsonl"))


def test_bundled_rotten_tomatoes():
    cfg = DataConfig()
    task = get_task(cfg)
    ex = load_examples(cfg)
    assert len(ex) == 12808
    assert sum(task.render(e).label for e in ex) == 7403  # fresh = class 1
    assert all("sentence" in e.fields for e in ex[:10])
    parts = load_splits(DataConfig(), task)  # the default split: dev 300, test 1000, train the rest
    assert [len(parts[k]) for k in ("dev", "test", "train")] == [300, 1000, 11508]


def _encoder(tiny_model, cfg):
    from transformers import AutoTokenizer

    return PromptEncoder(AutoTokenizer.from_pretrained(tiny_model), get_task(cfg), cfg)


def test_left_padding_and_positions(tiny_model, tiny_data):
    cfg = DataConfig(task="jsonl", path=str(tiny_data))
    enc = _encoder(tiny_model, cfg)
    assert enc.candidate_ids is not None  # single-token answers: one row per example, scored at the end
    split_ = EncodedSplit(enc, load_examples(cfg)[:3])
    toks = [it.rows[0][0] for it in split_.items]
    b = split_.batch([0, 1, 2])
    assert b.row_example is None and b.input_ids.shape[0] == 3
    for i, t in enumerate(toks):
        assert b.input_ids[i, -len(t):].tolist() == t
        assert b.attention_mask[i].sum() == len(t)
        assert b.position_ids[i, -len(t):].tolist() == list(range(len(t)))
    assert torch.equal(b.doubled().input_ids[:3], b.input_ids)


def test_multi_token_candidates_score_answer_rows(tiny_model, tiny_data):
    """A two-token answer: one row per (example, candidate), the answer's tokens at the end of each row."""
    cfg = DataConfig(task="jsonl", path=str(tiny_data), candidates=[" terrible", " great great"])
    enc = _encoder(tiny_model, cfg)
    assert enc.candidate_ids is None
    split_ = EncodedSplit(enc, load_examples(cfg)[:3])
    b = split_.batch([0, 1, 2], valid=[True, True, False])
    assert b.input_ids.shape[0] == 6 and b.num_candidates == 2
    assert b.row_example.tolist() == [0, 0, 1, 1, 2, 2] and b.row_candidate.tolist() == [0, 1] * 3
    assert b.target_len.tolist() == [1, 2] * 3
    great = enc.tokens(" great")[0]
    assert b.input_ids[1, -2:].tolist() == [great, great]
    assert b.row_valid().tolist() == [True, True, True, True, False, False]
    d = b.doubled()
    assert d.row_example.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and d.valid.tolist() == [True, True, False] * 2
