"""F1 and exact match against values computed by hand (SQuAD's normalisation: case, punctuation, articles)."""
import pytest

from dszo.tasks.metrics import exact_match, f1_score, normalize_answer


def test_normalize():
    assert normalize_answer("  The  North-Sea!  ") == "northsea"
    assert normalize_answer("An apple, a pear") == "apple pear"


@pytest.mark.parametrize("pred,answers,em,f1", [
    ("the North Sea", ["the North Sea"], 1.0, 1.0),
    ("North sea.", ["the North Sea"], 1.0, 1.0),                  # article and punctuation ignored
    ("the cold North Sea", ["the North Sea"], 0.0, 0.8),          # P = 2/3, R = 2/2 -> 2*(2/3)/(5/3) = 0.8
    ("Sea", ["the North Sea"], 0.0, 2 / 3),                       # P = 1, R = 1/2 -> 2/3
    ("every Monday", ["Monday", "every Monday"], 1.0, 1.0),       # best reference counts
    ("Monday morning", ["every Monday"], 0.0, 0.5),               # P = 1/2, R = 1/2
    ("seven", ["7"], 0.0, 0.0),
    ("", ["7"], 0.0, 0.0),
    ("the", ["a"], 1.0, 1.0),                                     # both normalise to empty
    ("red red", ["red"], 0.0, 2 / 3),                             # repeated tokens: P = 1/2, R = 1
])
def test_em_f1(pred, answers, em, f1):
    assert exact_match(pred, answers) == em
    assert f1_score(pred, answers) == pytest.approx(f1)
