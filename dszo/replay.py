"""The seed-replay log, and `dszo replay`: the base model plus a run's log reproduce its trained tensors.

A ZO step is determined by its seed, its projected gradients g and its learning rate: the direction is a pure
function of (seed, tensor, element). The main rank appends one line per step to `<output_dir>/replay.jsonl`
(`{"step", "seed", "g": [...], "lr", "skipped"}`, after a header with the run seed and the resolved config),
about 100 bytes a step. Replaying applies the same updates without a single training forward:

    deepspeed --num_gpus 2 --module dszo replay --run runs/rotten_tomatoes_zo_act   # -> <run>/replayed/<result file>

On the world size the run used, the result is bit-identical to the run's tensors (the same operations in the
same order); on another, equal within fp32 tolerance (ZO-Act's bases are recomputed from the calibration data,
whose all-reduced sums may add up in another order). Methods whose capabilities say they are not replayable
refuse: AGZO's subspace comes from each step's activations; the first-order reference logs no seeds.
"""
from __future__ import annotations

import json
from pathlib import Path

from dszo import comm
from dszo.assembly import build_run
from dszo.directions import direction_seed
from dszo.errors import ConfigError
from dszo.outputs import save_trained

LOG = "replay.jsonl"
FORMAT = 1


class ReplayLog:
    """Appends one line per step on the main rank; on resume, drops the lines after the checkpoint's step."""

    def __init__(self, out: Path, header: dict, start_step: int, enabled: bool) -> None:
        self.path, self.enabled, self._f = out / LOG, enabled, None
        if not enabled:
            return
        lines = self.path.read_text().splitlines() if start_step and self.path.exists() else []
        header = json.loads(lines[0]) if lines else header   # a resumed run keeps its log's original header
        keep = [ln for ln in lines[1:] if json.loads(ln)["step"] <= start_step]
        if start_step and len(keep) != start_step:
            keep = []  # an incomplete log cannot replay the run: start it afresh (marked in its header)
            header = {**header, "complete_from_step": start_step}
        self.path.write_text("".join(json.dumps(x) + "\n" for x in [header] + [json.loads(k) for k in keep]))
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, step: int, seed: int, record) -> None:
        """One ZO step (methods.base.ZOStep) and its seed."""
        if self._f:
            self._f.write(json.dumps({"step": step, "seed": seed, "g": record.proj_grads, "lr": record.lr,
                                      "skipped": record.skipped}) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()


def read_log(path: Path) -> tuple[dict, list[dict]]:
    if not path.is_file():
        raise ConfigError(f"{path} not found: the run wrote no replay log (replay_log: false, or not a dszo run)")
    lines = path.read_text().splitlines()
    try:
        header, steps = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    except (IndexError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable replay log ({e})") from e
    if header.get("format") != FORMAT or "complete_from_step" in header:
        raise ConfigError(f"{path}: format {header.get('format')!r} or a log that does not start at step 0")
    if [s["step"] for s in steps] != list(range(1, len(steps) + 1)):
        raise ConfigError(f"{path}: steps are not 1..{len(steps)} in order; the log is damaged")
    return header, steps


def kept_step(run_dir: Path) -> int:
    """The step of the model a finished run kept (load_best_model_at_end: its dev-best one), 0 if it kept its last."""
    results = run_dir / "results.json"
    return int(json.loads(results.read_text()).get("best_model_step") or 0) if results.is_file() else 0


def replay(run_dir: Path, cfg, steps_limit: int = 0) -> Path:
    """Rebuild the run's method on the base model, then apply the logged updates up to `steps_limit` (0: up to the
    model the run kept -- its dev-best one where it kept one, else its last); write the tensors."""
    if not cfg.method.capabilities().replayable:
        raise ConfigError(f"method {cfg.method.name} cannot be replayed from seeds and projected gradients alone "
                          "(AGZO's subspace comes from each step's activations; first_order logs no seeds)")
    header, steps = read_log(run_dir / LOG)
    method = build_run(cfg, int(header["run_seed"])).method
    steps = steps[:steps_limit or kept_step(run_dir) or None]
    for rec in steps:
        t = rec["step"] - 1
        if rec["skipped"]:
            continue
        for d, g in enumerate(rec["g"]):   # direction d·G + k of the step is g[d·G + k]; the update is their mean
            method.accumulate(t, direction_seed(rec["seed"], d), g / len(rec["g"]))
        method.update(t, rec["lr"])
    out = run_dir / "replayed"
    save_trained(method, out, cfg, len(steps))
    if comm.is_main():
        print(f"[dszo] replayed {len(steps)} steps of {run_dir}; tensors in {out / method.capabilities.result_file}")
    return out / method.capabilities.result_file


if __name__ == "__main__":  # the scripts of earlier versions: say what replaced them, do not succeed silently
    import sys

    sys.exit("dszo/replay.py is no longer a script: run python -m dszo replay ... "
             "(under a launcher: deepspeed --module dszo replay ...)")
