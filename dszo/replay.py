"""The seed-replay log, and `dszo replay`: the base model plus a run's log reproduce its trained tensors.

A ZO step is determined by its seed, its projected gradients g and its learning rate: the direction is a pure
function of (seed, tensor, element). The main rank appends one line per step to `<output_dir>/replay.jsonl`
(`{"step", "seed", "g": [...], "lr", "skipped"}`, after a header with the run seed and the resolved config),
about 100 bytes a step. Replaying applies the same updates without a single training forward:

    deepspeed --num_gpus 2 dszo/replay.py --run runs/rotten_tomatoes_zo_act      # -> <run>/replayed.safetensors

On the world size the run used, the result is bit-identical to the run's tensors (the same operations in the
same order); on another, equal within fp32 tolerance (ZO-Act's bases are recomputed from the calibration data,
whose all-reduced sums may add up in another order). AGZO cannot be replayed without forwards: its subspace
comes from each step's activations.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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

    def append(self, step: int, seed: int, stats) -> None:
        if self._f:
            self._f.write(json.dumps({"step": step, "seed": seed, "g": stats.proj_grads, "lr": stats.lr,
                                      "skipped": stats.skipped}) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()


def read_log(path: Path) -> tuple[dict, list[dict]]:
    from dszo.config import ConfigError

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


def replay(run_dir: Path, cfg, steps_limit: int = 0) -> Path:
    """Rebuild the run's method on the base model, then apply every logged update; write the tensors."""
    from dszo import comm
    from dszo.config import ConfigError
    from dszo.directions import direction_seed
    from dszo.train import build, save_trained

    header, steps = read_log(run_dir / LOG)
    if cfg.method.name in ("agzo", "first_order"):
        raise ConfigError(f"method {cfg.method.name} cannot be replayed from seeds and projected gradients alone "
                          "(AGZO's subspace comes from each step's activations; first_order logs no seeds)")
    _, _, method, rt, _ = build(cfg, int(header["run_seed"]))
    n_dir = cfg.method.num_directions
    for rec in steps[:steps_limit or None]:
        t = rec["step"] - 1
        if rec["skipped"]:
            continue
        for d, g in enumerate(rec["g"]):
            method.accumulate(t, direction_seed(rec["seed"], d), g / n_dir)
        method.update(t, rec["lr"])
    out = run_dir / "replayed"
    save_trained(method, out, cfg, len(steps))
    if comm.is_main():
        print(f"[dszo] replayed {len(steps)} steps of {run_dir}; tensors in {out / method.result_file}")
    return out / method.result_file


def main(argv=None) -> int:
    from dszo.train import run_cli

    return run_cli(argv, mode="replay")


if __name__ == "__main__":
    from dszo.train import _exit

    _exit(main())
