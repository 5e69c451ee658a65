"""The MeZO paper's classification and multiple-choice tasks, with its prompt templates and verbalisers
(princeton-nlp/MeZO, large_models/templates.py; the GPT-3-style template for ReCoRD, V3 for BoolQ).

Rows use the Hugging Face `datasets` schema of each task (glue/sst2, super_glue/<task>, boolq), whatever the
file format; the original SuperGLUE JSONL schema is also read where it differs only in a field's place
(WSC's `target`, string labels such as "entailment"). The answer a candidate stands for is appended to the
prompt; `null_prompt` is the content-free prompt MeZO's calibration ("sfc") uses.
"""
from __future__ import annotations

from dszo.tasks.base import DataError, Example, Rendered, Task, label_index, register

NO_YES = ["No", "Yes"]


class _Verbalized(Task):
    """A fixed list of answers (`verbalizer`, in label order) after a prompt; labels named by `label_names`."""

    verbalizer: list[str] = []
    label_names: list[str] = ["False", "True"]
    label_field = "label"

    def label(self, ex: Example) -> int:
        return label_index(ex.fields[self.label_field], self.label_names, ex.where)

    def fixed_candidates(self) -> list[str]:
        return list(self.verbalizer)

    def prompt(self, f: dict) -> str:
        raise NotImplementedError

    def render(self, ex: Example) -> Rendered:
        return Rendered(self.prompt(ex.fields), self.fixed_candidates(), self.label(ex), null_prompt="")


@register("sst2", "sst-2")
class SST2(_Verbalized):
    name, hub, required = "sst2", ("glue", "sst2"), ("sentence", "label")
    verbalizer = [" terrible", " great"]
    label_names = ["negative", "positive"]

    def prompt(self, f):
        return f"{f['sentence'].strip()} It was"

    def render(self, ex):
        r = super().render(ex)
        r.null_prompt = " It was"
        return r


@register("rte")
class RTE(_Verbalized):
    name, hub, required = "rte", ("super_glue", "rte"), ("premise", "hypothesis", "label")
    verbalizer = ["Yes", "No"]
    label_names = ["entailment", "not_entailment"]

    def prompt(self, f):
        return f"{f['premise']}\nDoes this mean that \"{f['hypothesis']}\" is true? Yes or No?\n"


@register("cb")
class CB(_Verbalized):
    name, hub, required = "cb", ("super_glue", "cb"), ("premise", "hypothesis", "label")
    verbalizer = ["Yes", "No", "Maybe"]
    label_names = ["entailment", "contradiction", "neutral"]

    def prompt(self, f):
        return f"Suppose {f['premise']} Can we infer that \"{f['hypothesis']}\"? Yes, No, or Maybe?\n"


@register("boolq")
class BoolQ(_Verbalized):
    name, hub, required = "boolq", ("super_glue", "boolq"), ("passage", "question")
    verbalizer = NO_YES

    def check(self, ex):
        super().check(ex)
        if "label" not in ex.fields and "answer" not in ex.fields:  # super_glue: label; the `boolq` dataset: answer
            raise DataError(f"{ex.where}: missing field 'label' (or 'answer') for task boolq")

    def label(self, ex):
        return label_index(ex.fields.get("label", ex.fields.get("answer")), self.label_names, ex.where)

    def prompt(self, f):
        q = f["question"].strip()
        q = (q if q.endswith("?") else q + "?")
        return f"{f['passage']} {q[0].upper() + q[1:]}\n"


@register("wic")
class WiC(_Verbalized):
    name, hub, required = "wic", ("super_glue", "wic"), ("word", "sentence1", "sentence2", "label")
    verbalizer = NO_YES

    def prompt(self, f):
        return (f"Does the word \"{f['word']}\" have the same meaning in these two sentences? Yes, No?\n"
                f"{f['sentence1']}\n{f['sentence2']}\n")


@register("wsc")
class WSC(_Verbalized):
    name, hub, required = "wsc", ("super_glue", "wsc.fixed"), ("text", "label")
    verbalizer = NO_YES

    def check(self, ex):
        super().check(ex)
        if self._spans(ex.fields) is None:
            raise DataError(f"{ex.where}: missing fields 'span1_text'/'span2_text' (or 'target') for task wsc")

    @staticmethod
    def _spans(f):
        src = f.get("target", f) if isinstance(f.get("target"), dict) else f  # original SuperGLUE JSONL: target{}
        if src.get("span1_text") in (None, "") or src.get("span2_text") in (None, ""):
            return None
        return src["span1_text"], src["span2_text"]

    def prompt(self, f):
        span1, span2 = self._spans(f)
        return f"{f['text']}\nIn the previous sentence, does the pronoun \"{span2.lower()}\" refer to {span1}? Yes or No?\n"


@register("multirc")
class MultiRC(_Verbalized):
    name, hub, required = "multirc", ("super_glue", "multirc"), ("paragraph", "question", "answer", "label")
    verbalizer = NO_YES

    def prompt(self, f):
        return (f"{f['paragraph']}\nQuestion: {f['question']}\nI found this answer \"{f['answer']}\". "
                "Is that correct? Yes or No?\n")


@register("copa")
class COPA(Task):
    name, hub, kind = "copa", ("super_glue", "copa"), "multiple_choice"
    required = ("premise", "choice1", "choice2", "question", "label")

    def fixed_candidates(self):
        return None

    @staticmethod
    def _lower_first(choice: str) -> str:
        words = choice.split(" ")
        if words[0] != "I":
            words[0] = words[0].lower()
        return " ".join(words)

    def render(self, ex):
        f = ex.fields
        conj = {"cause": " because", "effect": " so"}.get(f["question"])
        if conj is None:
            raise DataError(f"{ex.where}: COPA question must be 'cause' or 'effect', got {f['question']!r}")
        premise = f["premise"].rstrip()
        premise = premise[:-1] if premise.endswith(".") else premise
        cands = [" " + self._lower_first(f["choice1"]), " " + self._lower_first(f["choice2"])]
        return Rendered(premise + conj, cands, label_index(f["label"], ["0", "1"], ex.where), null_prompt=conj.strip())


@register("record")
class ReCoRD(Task):
    """Cloze over the passage's entities: each candidate is the query with @placeholder replaced by one entity
    (MeZO's GPT-3-style template); right = the first entity that is among the answers."""

    name, hub, kind = "record", ("super_glue", "record"), "multiple_choice"
    required = ("passage", "query", "entities", "answers")

    def fixed_candidates(self):
        return None

    def render(self, ex):
        f = ex.fields
        entities = list(dict.fromkeys(f["entities"]))  # unique, in order
        answers = set(f["answers"])
        right = [i for i, e in enumerate(entities) if e in answers]
        if not right:
            raise DataError(f"{ex.where}: none of the ReCoRD answers {sorted(answers)} is among the entities")
        passage = f["passage"].replace("@highlight\n", "- ")
        cands = [" " + f["query"].replace("@placeholder", e) for e in entities]
        return Rendered(f"{passage}\n-", cands, right[0], null_prompt="-")
