"""Every task's template and label mapping on the fixture rows (tests/fixtures/tasks/<task>/), against the
prompts written out by hand from the MeZO paper's templates."""
from pathlib import Path

import pytest

from dszo.config import DataConfig
from dszo.tasks import DataError, Example, get_task
from dszo.tasks.sources import read_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"


def render(task: str, split: str, row: int):
    ex = read_file(FIXTURES / task / f"{split}.jsonl")[row]
    t = get_task(DataConfig(task=task))
    t.check(ex)
    return t.render(ex)


CASES = [
    # task, split, row, prompt, candidates, label
    ("sst2", "train", 0, "a warm and clever little film It was", [" terrible", " great"], 1),
    ("sst2", "validation", 0, "a tedious mess It was", [" terrible", " great"], 0),
    ("rte", "train", 1, 'Sam bought bread.\nDoes this mean that "Sam bought a car." is true? Yes or No?\n', ["Yes", "No"], 1),
    ("rte", "validation", 0, 'The shop opens at nine.\nDoes this mean that "The shop opens in the morning." is true? '
                             "Yes or No?\n", ["Yes", "No"], 0),  # string label "entailment"
    ("cb", "train", 1, 'Suppose Bo doubted the plan would work. Can we infer that "the plan would work"? Yes, No, or Maybe?\n',
     ["Yes", "No", "Maybe"], 2),
    ("cb", "validation", 0, 'Suppose Kim thinks it will snow. Can we infer that "it will snow"? Yes, No, or Maybe?\n',
     ["Yes", "No", "Maybe"], 2),  # "neutral"
    ("boolq", "train", 0, "The lake freezes every winter. Is the lake frozen in winter?\n", ["No", "Yes"], 1),
    ("boolq", "train", 1, "Most fish cannot leave the water. Can fish fly?\n", ["No", "Yes"], 0),
    ("boolq", "validation", 0, "Tea is a drink made from leaves. Is tea a drink?\n", ["No", "Yes"], 1),  # `answer: true`
    ("wsc", "train", 0, 'Mia gave Zoe a book because she liked reading.\nIn the previous sentence, does the pronoun "she" '
                        "refer to Zoe? Yes or No?\n", ["No", "Yes"], 1),
    ("wsc", "validation", 0, 'Ray called Lou so he could talk.\nIn the previous sentence, does the pronoun "he" refer to '
                             "Ray? Yes or No?\n", ["No", "Yes"], 1),  # original SuperGLUE `target`
    ("wic", "train", 0, 'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
                        "We sat on the river bank.\nThe bank raised its rates.\n", ["No", "Yes"], 0),
    ("multirc", "train", 1, 'Tom has two dogs and a cat.\nQuestion: How many dogs does Tom have?\nI found this answer "Five". '
                            "Is that correct? Yes or No?\n", ["No", "Yes"], 0),
    ("copa", "train", 0, "The man broke his toe because", [" he dropped a hammer on his foot.", " he got a hole in his sock."], 0),
    ("copa", "train", 1, "I tipped the bottle so", [" the liquid in the bottle froze.", " the liquid in the bottle poured out."], 1),
    ("copa", "validation", 0, "The girl was cold so", [" she put on a coat.", " I opened the fridge."], 0),  # "I" stays
    ("record", "train", 0, "Lina met Omar in Paris.\n- They ate at a cafe\n-",
     [" Lina paid the bill.", " Omar paid the bill.", " Paris paid the bill."], 1),
    ("record", "train", 1, "The Reds beat the Blues in Leeds.\n-",  # duplicate entity listed once
     [" The fans of Reds cheered.", " The fans of Blues cheered.", " The fans of Leeds cheered."], 0),
]


@pytest.mark.parametrize("task,split,row,prompt,candidates,label", CASES)
def test_template_and_label(task, split, row, prompt, candidates, label):
    r = render(task, split, row)
    assert r.prompt == prompt
    assert r.candidates == candidates
    assert r.label == label


def test_calibration_prompts():
    assert render("sst2", "train", 0).null_prompt == " It was"
    assert render("copa", "train", 0).null_prompt == "because"
    assert render("record", "train", 0).null_prompt == "-"
    assert render("rte", "train", 0).null_prompt == ""


@pytest.mark.parametrize("task,row,prompt,answers", [
    ("squad", 0, "Title: Rivers\nContext: The Blue River is 300 km long and flows into the North Sea.\n"
                 "Question: Where does the Blue River flow into?\nAnswer:", ["the North Sea"]),
    ("drop", 0, "Passage: The Hawks scored 21 points and the Owls scored 14.\n"
                "Question: How many more points did the Hawks score?\nAnswer:", ["7"]),
])
def test_generation_templates(task, row, prompt, answers):
    r = render(task, "train", row)
    assert r.prompt == prompt and r.answers == answers and not r.candidates
    t = get_task(DataConfig(task=task, loss="lm"))
    assert t.generation
    assert t.gold_continuation(r) == f" {answers[0]}\n"   # the LM loss's target: answer, then the stop string


def test_demonstration_is_prompt_plus_right_answer():
    t = get_task(DataConfig(task="copa"))
    ex = read_file(FIXTURES / "copa" / "train.jsonl")[1]
    assert t.demonstration(ex) == "I tipped the bottle so the liquid in the bottle poured out."
    q = get_task(DataConfig(task="squad", loss="lm"))
    ex = read_file(FIXTURES / "squad" / "train.jsonl")[1]
    assert q.demonstration(ex).endswith("Question: How long is the Blue River?\nAnswer: 300 km")


@pytest.mark.parametrize("task,row,match", [
    ("rte", {"premise": "a", "hypothesis": "b", "label": "maybe"}, r"f.jsonl:1: unknown label 'maybe'"),
    ("rte", {"premise": "a", "label": 0}, r"f.jsonl:1: missing field 'hypothesis' for task rte"),
    ("copa", {"premise": "a", "choice1": "b", "choice2": "c", "question": "why", "label": 0}, r"'cause' or 'effect'"),
    ("record", {"passage": "p", "query": "@placeholder q", "entities": ["A"], "answers": ["B"]}, r"none of the ReCoRD answers"),
    ("squad", {"context": "c", "question": "q", "answers": {"text": []}}, r"no reference answer"),
    ("wsc", {"text": "t", "label": 0}, r"span1_text"),
])
def test_bad_rows(task, row, match):
    t = get_task(DataConfig(task=task, loss="lm" if task == "squad" else "classification"))
    ex = Example(row, "f.jsonl:1")
    with pytest.raises(DataError, match=match):
        t.check(ex)
        t.render(ex)


def test_custom_task_from_config(tmp_path):
    cfg = DataConfig(task="custom", path=str(tmp_path / "x.jsonl"), template="Q: {question}\nA:",
                     labels=["no", "yes"], candidates=[" no", " yes"], label_field="answer")
    t = get_task(cfg)
    r = t.render(Example({"question": "Is it?", "answer": "yes"}, "x"))
    assert (r.prompt, r.candidates, r.label, r.null_prompt) == ("Q: Is it?\nA:", [" no", " yes"], 1, "Q: \nA:")
    mc = get_task(DataConfig(task="custom", path="x", template="{q}", choices_field="options", label_field="answer"))
    r = mc.render(Example({"q": "Pick", "options": ["red", "green"], "answer": "green"}, "x"))
    assert (r.candidates, r.label) == ([" red", " green"], 1)
    with pytest.raises(DataError, match="must be a list of at least 2"):
        mc.render(Example({"q": "Pick", "options": "red", "answer": 0}, "x:3"))
