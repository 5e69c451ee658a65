"""Generation tasks of the MeZO paper: SQuAD and DROP, scored by F1 and exact match against every reference
answer (the best one counts), with MeZO's templates. Rows use the `datasets` schema: SQuAD `title`, `context`,
`question`, `answers` {text: [...]}; DROP (ucinlp/drop) `passage`, `question`, `answers_spans` {spans: [...]}.
A flat list (or one string) of answers is read as well."""
from __future__ import annotations

import json

from dszo.tasks.base import DataError, Example, Rendered, Task, register


def answer_list(value, where: str, key: str) -> list[str]:
    if isinstance(value, str):
        s = value.strip()
        if s.startswith(("[", "{")):  # a CSV cell holding JSON
            try:
                value = json.loads(s)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: answers field is not valid JSON ({e.msg})") from e
        else:
            value = [value]
    if isinstance(value, dict):
        value = value.get(key, value.get("text"))
    answers = [str(a) for a in (value or []) if str(a).strip()]
    if not answers:
        raise DataError(f"{where}: no reference answer (an empty '{key}' list); drop the row or fill it in")
    return answers


class _QA(Task):
    kind = "generation"
    answers_field, answers_key = "answers", "text"

    def fixed_candidates(self):
        return None

    def render(self, ex: Example) -> Rendered:
        answers = answer_list(ex.fields[self.answers_field], ex.where, self.answers_key)
        return Rendered(self.prompt(ex.fields), answers=answers)


@register("squad")
class SQuAD(_QA):
    name, hub, required = "squad", ("squad",), ("context", "question", "answers")

    def prompt(self, f):
        return f"Title: {f.get('title', '')}\nContext: {f['context']}\nQuestion: {f['question'].strip()}\nAnswer:"


@register("drop")
class DROP(_QA):
    name, hub, required = "drop", ("ucinlp/drop",), ("passage", "question", "answers_spans")
    answers_field, answers_key = "answers_spans", "spans"

    def prompt(self, f):
        return f"Passage: {f['passage']}\nQuestion: {f['question'].strip()}\nAnswer:"
