"""From rendered examples to token batches, and the step sampler.

An example's prompt is scored on what follows it. Two batch layouts:
- one row per example (`row_example is None`): the prompt alone. For tasks whose answers are the same single
  tokens for every example (SST-2, RTE, the bundled task...) the candidates' logits are read at the last
  position -- one forward row per example, as MeZO's `train_as_classification` with one-token verbalisers;
  for generation the row is what decoding starts from.
- one row per (example, candidate): prompt + candidate, the candidate's tokens scored (multi-token answers,
  COPA, ReCoRD, the LM loss on the answer tokens, calibration rows for `scoring: calibrated`).
Rows are left-padded with explicit position ids, so scored tokens sit at the end and padding never shifts
positions. The global batch of step t is a pure function of (seed, t), cut into rank / micro-batch slices, so
the examples a step sees do not depend on the world size.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch

from dszo.directions import mix
from dszo.tasks import DataError, Example, Task

DEMO_SEPARATOR = "\n\n"


@dataclass
class Batch:
    input_ids: torch.Tensor       # [rows, s], left-padded
    attention_mask: torch.Tensor  # [rows, s]
    position_ids: torch.Tensor    # [rows, s]
    labels: torch.Tensor          # [e] index of the right candidate
    valid: torch.Tensor           # [e] bool: False for filler examples (equal batch counts across ranks)
    row_example: Optional[torch.Tensor] = None    # [rows] example of each row; None: one row per example
    row_candidate: Optional[torch.Tensor] = None  # [rows] candidate of each row
    row_null: Optional[torch.Tensor] = None       # [rows] bool: a calibration (content-free prompt) row
    target_len: Optional[torch.Tensor] = None     # [rows] scored tokens at the end of each row
    num_candidates: int = 0
    answers: list = field(default_factory=list)   # generation: reference answers per example
    slot: int = 0                 # direction parallelism: the direction slot this batch is measured for

    @property
    def num_examples(self) -> int:
        return self.labels.shape[0]

    def row_valid(self) -> torch.Tensor:
        return self.valid if self.row_example is None else self.valid[self.row_example]

    def token_mask(self) -> torch.Tensor:
        return self.attention_mask.bool() & self.row_valid()[:, None]

    def _map(self, fn) -> "Batch":
        return replace(self, **{f.name: fn(f.name, getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device) -> "Batch":
        return self._map(lambda _, t: t.to(device))

    def doubled(self) -> "Batch":
        """[batch; batch]: the first copy's examples are 0..e-1, the second's e..2e-1."""
        e = self.num_examples
        return self._map(lambda n, t: torch.cat([t, t + e if n == "row_example" else t]))


def pad_rows(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s = len(token_lists), max(len(x) for x in token_lists)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    for i, x in enumerate(token_lists):
        input_ids[i, s - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, s - len(x):] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class Encoded:
    rows: list[tuple[list[int], int]]       # (token ids, scored tokens at the end) per candidate, or [(prompt, 0)]
    label: int
    null_rows: list[tuple[list[int], int]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


class PromptEncoder:
    """Renders examples with their task and tokenizes them. `candidate_ids` is set when every example's answers
    are the same single tokens (scored at the last position); `scoring: calibrated` always uses answer rows."""

    def __init__(self, tokenizer, task: Task, cfg) -> None:
        self.tok, self.task, self.cfg = tokenizer, task, cfg
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.candidate_ids: Optional[list[int]] = None
        fixed = task.fixed_candidates()
        if fixed is not None and cfg.scoring != "calibrated":
            ids = [self.tokens(c) for c in fixed]
            if all(len(t) == 1 for t in ids):
                self.candidate_ids = [t[0] for t in ids]

    def tokens(self, text: str, special: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=special).input_ids

    def prompt_ids(self, prompt: str, reserve: int = 0) -> list[int]:
        return self.tokens(prompt, special=True)[-max(1, self.cfg.max_length - reserve):]  # keep the end

    def join(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        """prompt + continuation as tokens, the continuation's count; trailing spaces of the prompt move to the
        continuation (BPE tokenizers attach a space to the word after it). Long prompts lose their start."""
        stripped = prompt.rstrip(" ")
        cont = self.tokens(prompt[len(stripped):] + continuation)
        if not cont:
            raise DataError(f"an answer tokenizes to nothing: {continuation!r}")
        return self.prompt_ids(stripped, reserve=len(cont)) + cont, len(cont)

    def with_demos(self, prompt: str, demos: list[Example]) -> str:
        return "".join(self.task.demonstration(d) + DEMO_SEPARATOR for d in demos) + prompt

    def encode(self, ex: Example, purpose: str, demos: list[Example] = ()) -> Encoded:
        r = self.task.render(ex)
        prompt = self.with_demos(r.prompt, demos)
        if purpose == "train" and self.cfg.loss == "lm":
            return Encoded([self.join(prompt, self.task.gold_continuation(r))], 0)
        if self.task.generation or self.candidate_ids is not None:
            return Encoded([(self.prompt_ids(prompt), 0)], r.label or 0, answers=r.answers)
        null = [self.join(r.null_prompt, c) for c in r.candidates] if self.cfg.scoring == "calibrated" else []
        return Encoded([self.join(prompt, c) for c in r.candidates], r.label, null)


class EncodedSplit:
    """A split's examples, encoded once for `purpose` ("train": the training loss; "eval": scoring or
    generation). `num_demos` > 0 prepends that many demonstrations drawn from `demo_pool` (seeded per example)."""

    def __init__(self, encoder: PromptEncoder, examples: list[Example], purpose: str = "train",
                 num_demos: int = 0, demo_pool: list[Example] = (), seed: int = 0) -> None:
        self.encoder = encoder
        if num_demos and len(demo_pool) < num_demos:
            raise DataError(f"data.num_demos = {num_demos} but only {len(demo_pool)} training examples to draw from")
        pool = list(demo_pool)
        self.items = [encoder.encode(ex, purpose, random.Random(mix(seed, 0xDE30, i)).sample(pool, num_demos)
                                     if num_demos else ()) for i, ex in enumerate(examples)]
        self.one_row = all(len(it.rows) == 1 and it.rows[0][1] == 0 for it in self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def num_tokens(self, i: int) -> int:
        return sum(len(ids) for ids, _ in self.items[i].rows)

    def batch(self, indices: list[int], valid: Optional[list[bool]] = None) -> Batch:
        items = [self.items[i] for i in indices]
        labels = torch.tensor([it.label for it in items], dtype=torch.long)
        valid_t = torch.tensor(valid if valid is not None else [True] * len(items))
        if self.one_row:
            return Batch(*pad_rows([it.rows[0][0] for it in items], self.encoder.pad_id), labels, valid_t,
                         answers=[it.answers for it in items])
        rows, ex, cand, null, tlen = [], [], [], [], []
        for j, it in enumerate(items):
            for is_null, part in ((False, it.rows), (True, it.null_rows)):
                for c, (ids, n) in enumerate(part):
                    rows.append(ids), ex.append(j), cand.append(c), null.append(is_null), tlen.append(n)
        long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return Batch(*pad_rows(rows, self.encoder.pad_id), labels, valid_t, long(ex), long(cand), torch.tensor(null),
                     long(tlen), num_candidates=max(len(it.rows) for it in items))

    def rank_batches(self, indices: list[int], rank: int, world: int, batch_size: int,
                     by_length: bool = True) -> list[Batch]:
        """This rank's contiguous part of `indices`, in batches of `batch_size` examples; every rank gets the same
        number of batches (ZeRO-3 forwards are collective), short ones filled with valid=False copies of a real
        example. `by_length` sorts the part by token count first: order does not matter for evaluation or
        calibration sums, and similar lengths waste little compute on padding."""
        per_rank = -(-len(indices) // world)
        mine = indices[rank * per_rank:(rank + 1) * per_rank]
        if by_length:
            mine = sorted(mine, key=self.num_tokens)
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

    def slot_micro_batches(self, t: int, groups: int, slot: int, position: int, sharing: int,
                           accum: int) -> list[list[int]]:
        """Direction slot `slot` of `groups` measures part `slot` of the global batch; the `sharing` ranks that
        measure it split that part, this rank taking share `position`, in `accum` micro-batches. With one group
        this is rank_micro_batches (position = rank, sharing = world)."""
        g = self.global_indices(t)
        part = len(g) // groups
        share = part // sharing
        mine = g[slot * part + position * share: slot * part + (position + 1) * share]
        micro = share // accum
        return [mine[j * micro:(j + 1) * micro] for j in range(accum)]

    def rank_micro_batches(self, t: int, rank: int, world: int, micro: int, accum: int) -> list[list[int]]:
        g = self.global_indices(t)
        base = rank * micro * accum
        return [g[base + j * micro: base + (j + 1) * micro] for j in range(accum)]
