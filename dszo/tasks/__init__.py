"""Tasks: the MeZO paper's suite (SST-2, RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD, SQuAD, DROP), custom
tasks from the config, and the bundled offline Rotten Tomatoes task. `get_task(data_cfg)` by `data.task`."""
from dszo.tasks import custom, qa, superglue  # noqa: F401  (register the tasks)
from dszo.tasks.base import REGISTRY, DataError, Example, Rendered, Task
from dszo.tasks.sources import load_splits, split


def get_task(cfg) -> Task:
    if cfg.task not in REGISTRY:
        raise DataError(f"unknown data.task {cfg.task!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[cfg.task](cfg)


__all__ = ["DataError", "Example", "Rendered", "Task", "get_task", "load_splits", "split", "REGISTRY"]
