"""What a task is: how one example of its data becomes a prompt, its candidate answers (or reference answers
for generation), and which candidate is right. Tasks are plain Python, registered by name (PEFT-style).

A task renders an example into a `Rendered`:
- classification / multiple choice: `prompt` and `candidates`, the text appended to the prompt for each
  answer (the scored continuation), and `label`, the index of the right one;
- generation: `prompt` and `answers`, the reference strings the generated text is scored against (F1 / EM).

`null_prompt` is the content-free prompt of MeZO's surface-form-competition calibration ("sfc"): the score of a
candidate under it is subtracted from its score under the real prompt (`data.scoring: calibrated`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional


class DataError(ValueError):
    """Bad data: the message names the file, the line and the fix."""


@dataclass
class Example:
    fields: dict
    where: str = ""               # "file:line" for error messages


@dataclass
class Rendered:
    prompt: str
    candidates: list[str] = field(default_factory=list)
    label: Optional[int] = None
    answers: list[str] = field(default_factory=list)
    null_prompt: str = ""


class Task:
    """One task: its kind, its data sources, and how an example is rendered."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "classification"       # classification | multiple_choice | generation
    hub: ClassVar[tuple] = ()                    # (path, config) for datasets.load_dataset where a hub is reachable
    required: ClassVar[tuple] = ()               # fields every row must have
    eval_split: ClassVar[str] = "validation"     # where the papers' test examples come from (SuperGLUE test is unlabeled)

    def __init__(self, cfg) -> None:
        self.cfg = cfg                           # the DataConfig

    @property
    def generation(self) -> bool:
        return self.kind == "generation"

    def check(self, ex: Example) -> None:
        for f in self.required:
            if ex.fields.get(f) in (None, ""):
                raise DataError(f"{ex.where}: missing field '{f}' for task {self.name} (its rows need "
                                f"{', '.join(self.required)}; see the task's schema in dszo/tasks/)")

    def render(self, ex: Example) -> Rendered:
        raise NotImplementedError

    def demonstration(self, ex: Example) -> str:
        """The example with its right answer, as an in-context demonstration."""
        r = self.render(ex)
        return r.prompt + (f" {r.answers[0]}" if self.generation else r.candidates[r.label])

    def gold_continuation(self, r: Rendered) -> str:
        """What the LM loss is computed on: the right candidate, or the first reference answer and a newline."""
        return f" {r.answers[0]}\n" if self.generation else r.candidates[r.label]


def label_index(value, names: list[str], where: str, hint: str = "") -> int:
    """A label as an index into `names`: the name itself, an integer index, or a boolean (False/True = 0/1)."""
    if isinstance(value, bool):
        value = int(value)
    s = str(value).strip()
    if s in names:
        return names.index(s)
    if s.lower() in ("true", "false") and len(names) == 2:
        return int(s.lower() == "true")
    if s.lstrip("-").isdigit() and 0 <= int(s) < len(names):
        return int(s)
    raise DataError(f"{where}: unknown label {value!r}; expected one of {names} or an index 0..{len(names) - 1}{hint}")


REGISTRY: dict[str, type[Task]] = {}


def register(*names: str):
    def deco(cls: type[Task]) -> type[Task]:
        for n in names:
            REGISTRY[n] = cls
        return cls
    return deco
