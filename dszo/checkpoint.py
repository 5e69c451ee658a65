"""Resumable checkpoints: every rank's partitions of the trained tensors and their optimiser state, plus the
run's metadata, written atomically; read back on any world size.

Layout of `<output_dir>/checkpoint-<step>/`:
    rank00000-of-00002.safetensors   this rank's entries; its metadata maps entry -> [start, end, shape]
    meta.json                        step, run seed, data position, method scalars, resolved config, versions
Every entry is a flat slice [start, end) of a named tensor (a trained tensor, a fixed basis, an optimiser
moment), so a rank of another world size reads the slices it owns now from whichever files hold them
(resharding on load). Ranks write into `checkpoint-<step>.tmp/`; once all have, the main rank writes
meta.json, renames the folder and points `latest` at it (write-then-rename), then drops the oldest beyond
`save_total_limit` (except the dev-best model's, dszo/best.py). A crash while writing leaves only a `.tmp` folder,
which resume ignores.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from dszo import comm
from dszo.methods.base import Partition

FORMAT = 1
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the fix."""


def rank_file(rank: int, world: int) -> str:
    return f"rank{rank:05d}-of-{world:05d}.safetensors"


def step_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step}"


def write_rank(tmp: Path, rank: int, world: int, entries: dict[str, Partition]) -> None:
    from safetensors.torch import save_file

    index = {n: [s.start, s.end, list(s.shape)] for n, s in entries.items()}
    tensors = {n: s.local.detach().contiguous().clone() for n, s in entries.items()}
    path = tmp / rank_file(rank, world)
    save_file(tensors, str(path) + ".part", metadata={"dszo_index": json.dumps(index)})
    _fsync(str(path) + ".part")
    os.replace(str(path) + ".part", path)


def finish(out: Path, tmp: Path, step: int, meta: dict, keep: int) -> Path:
    """Main rank, after every rank has written: metadata, rename, `latest`, pruning."""
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1) + "\n")
    _fsync(tmp / "meta.json")
    final = step_dir(out, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(out / LATEST, final.name + "\n")
    if keep > 0:
        done = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                      key=lambda p: int(p.name.split("-")[-1]))
        best = (meta.get("best_model") or {}).get("step")   # the dev-best model's, kept as HF keeps it (dszo/best.py)
        for old in done[:-keep]:
            if best is None or old != step_dir(out, best):
                shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve(out: Path, spec: str) -> Path:
    """`latest` (the pointer in output_dir) or a checkpoint folder."""
    if spec == LATEST:
        pointer = out / LATEST
        if not pointer.is_file():
            raise CheckpointError(f"resume_from_checkpoint: latest, but {out} has no '{LATEST}' pointer (no "
                                  "checkpoint was saved there; set save_steps, or name a checkpoint folder)")
        path = out / pointer.read_text().strip()
    else:
        path = Path(spec)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete dszo checkpoint (no meta.json): a save that did not finish "
                              "leaves a .tmp folder; name a finished checkpoint-<step> folder")
    return path


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'meta.json'} is corrupted ({e.msg}); resume from an earlier checkpoint") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this dszo reads {FORMAT}")
    return meta


class Reader:
    """Reads any slice of any entry from the rank files of a checkpoint (whatever world size wrote them)."""

    def __init__(self, path: Path, world: int) -> None:
        from safetensors import safe_open

        self.path = path
        files = [path / rank_file(r, world) for r in range(world)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)}; the checkpoint is incomplete")
        self.handles, self.index = [], {}
        for f in files:
            try:
                h = safe_open(str(f), "pt")
                idx = json.loads((h.metadata() or {})["dszo_index"])
            except Exception as e:  # a truncated or overwritten file
                raise CheckpointError(f"{f} is corrupted or not a dszo checkpoint file ({e}); resume from an "
                                      "earlier checkpoint") from e
            self.handles.append(h)
            for name, (start, end, shape) in idx.items():
                self.index.setdefault(name, []).append((start, end, tuple(shape), h))

    def names(self) -> set[str]:
        return set(self.index)

    def shape(self, name: str) -> tuple:
        return self.index[name][0][2]

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `name` (ranges of two files may overlap: rows that
        two ranks both updated, identically)."""
        if name not in self.index:
            raise CheckpointError(f"{self.path}: no entry {name!r}; the checkpoint comes from another model, method "
                                  "or method config")
        parts = [(s, e, h) for s, e, _, h in self.index[name] if max(s, start) < min(e, end)]
        if end > start and not _covered(parts, start, end):
            raise CheckpointError(f"{self.path}: entry {name!r} does not cover elements [{start}, {end})")
        out = None
        for s, e, h in parts:
            lo, hi = max(s, start), min(e, end)
            part = h.get_slice(name)[lo - s:hi - s]
            if out is None:
                out = torch.empty(end - start, dtype=part.dtype)
            out[lo - start:hi - start] = part
        return out if out is not None else torch.empty(0)

    def load_into(self, part: Partition, name: Optional[str] = None) -> None:
        name = name or part.name
        if name in self.index and self.shape(name) != tuple(part.shape):
            raise CheckpointError(f"{self.path}: {name} has shape {self.shape(name)}, the model's is {part.shape}; "
                                  "the checkpoint comes from another model or method config")
        part.local.copy_(self.read(name, part.start, part.end).to(part.local.dtype))


class SavedState:
    """What a method's load_state_dict reads: any slice of a tensor its state_dict held (from the rank files of any
    world size), and its scalars."""

    def __init__(self, reader: Reader, scalars: dict) -> None:
        self.reader, self.scalars = reader, scalars

    def names(self) -> set[str]:
        return self.reader.names()

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        return self.reader.read(name, start, end)

    def load_into(self, part: Partition) -> None:
        self.reader.load_into(part)


def _covered(ranges, start: int, end: int) -> bool:
    pos = start
    for s, e, _ in sorted(ranges, key=lambda x: x[0]):
        if s <= pos < e:
            pos = e
    return pos >= end


def versions() -> dict:
    from importlib.metadata import version

    import dszo

    return {"dszo": getattr(dszo, "__version__", "0"), "torch": torch.__version__, "deepspeed": version("deepspeed"),
            "transformers": version("transformers")}


# ----------------------------------------------------------------------------------------------
# What a run saves and restores (every rank; the collectives keep ranks in step and agree on failures). The parts
# that own state give it through state_dict() / load_state_dict(): the method (Partitions of its tensors and
# optimiser state, plus scalars), the trainer (run seed, config, data position) and the process' RNG.

# Settings that shape the trajectory: a resume under other values would not continue the same run.
ADDED_METHOD_DEFAULTS = {"directions": "gaussian"}   # method keys added since checkpoints were first written
TRAJECTORY_KEYS = ("model", "data", "method", "seed", "optim", "learning_rate", "lr_scheduler_type", "warmup_steps",
                   "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "momentum")


class RNGState:
    """The process' torch RNG as a checkpointed part."""

    @staticmethod
    def state_dict() -> dict:
        return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}

    @staticmethod
    def load_state_dict(state: dict) -> None:
        if state.get("torch"):
            torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def save(out: Path, step: int, method, trainer, keep: int) -> Path:
    """This rank's Partitions of the method's state into checkpoint-<step>/, the scalars into meta.json."""
    state = method.state_dict()
    partitions = {n: v for n, v in state.items() if isinstance(v, Partition)}
    tmp = out / f"checkpoint-{step}.tmp"
    if comm.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    problem = ""
    try:
        write_rank(tmp, comm.rank(), comm.world_size(), partitions)
    except Exception as e:  # disk full, permissions (safetensors raises its own error type for I/O): every rank
        # learns of it, and the previous checkpoint stays as it was
        problem = (f"rank {comm.rank()} could not write its checkpoint shard to {tmp}: "
                   f"{getattr(e, 'strerror', None) or e}; the previous checkpoint is intact")
    if comm.all_max_int(int(bool(problem))):
        raise CheckpointError(problem or f"another rank could not write its part of {tmp} (see its error); "
                              "the previous checkpoint is intact")
    final = step_dir(out, step)
    if comm.is_main():
        try:
            meta = {**trainer.state_dict(), "rng": RNGState.state_dict(), "step": step, "world_size": comm.world_size(),
                    "method_state": {n: v for n, v in state.items() if n not in partitions}, "versions": versions()}
            final = finish(out, tmp, step, meta, keep)
        except OSError as e:
            problem = f"could not finish checkpoint {tmp}: {e.strerror or e}"
    if comm.all_max_int(int(bool(problem))):
        raise CheckpointError(problem or f"the main rank could not finish {tmp} (see its error)")
    return final


def check_compatible(meta: dict, cfg: dict, world: int, path: Path) -> None:
    """The checkpoint must come from this run's settings; the world size may differ (the global batch may not)."""
    old = {**meta["config"], "method": {**ADDED_METHOD_DEFAULTS, **meta["config"]["method"]}}
    directions = lambda c: c["method"].get("num_directions", 1) * c.get("direction_groups", 1)  # noqa: E731
    if directions(old) != directions(cfg):
        raise CheckpointError(f"{path} was saved with {directions(old)} directions a step (direction_groups x "
                              f"method.num_directions), this run has {directions(cfg)}: keep the product")
    for key in TRAJECTORY_KEYS:
        for name, was, now in _differences(key, old.get(key), cfg.get(key)):
            if name == "method.num_directions":   # may trade against direction_groups (checked above)
                continue
            raise CheckpointError(f"{path} was saved with {name} = {was!r}, this run has {now!r}: resume with the "
                                  "same settings (or start a new run in another output_dir)")
    batch = lambda c, w: c["per_device_train_batch_size"] * c["gradient_accumulation_steps"] * w  # noqa: E731
    if batch(old, meta["world_size"]) != batch(cfg, world):
        raise CheckpointError(f"{path}: global batch {batch(old, meta['world_size'])} (world size {meta['world_size']}) "
                              f"but this run's is {batch(cfg, world)} (world size {world}); on another world size set "
                              "per_device_train_batch_size so that the global batch stays the same")
    if cfg["lr_scheduler_type"] != "constant" and old["max_steps"] != cfg["max_steps"]:
        raise CheckpointError(f"{path}: max_steps {old['max_steps']} -> {cfg['max_steps']} would change the "
                              f"{cfg['lr_scheduler_type']} learning-rate schedule; keep max_steps")
    if meta["step"] > cfg["max_steps"]:
        raise CheckpointError(f"{path} is at step {meta['step']}, beyond max_steps = {cfg['max_steps']}")


def _differences(name: str, a, b):
    """(dotted key, old, new) of every leaf where two config values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _differences(f"{name}.{k}", a.get(k), b.get(k))
    elif a != b:
        yield name, a, b


def restore_method(path: Path, method, meta: Optional[dict] = None) -> None:
    """Only the method's state (trained tensors, optimiser moments, scalars); alone, the dev-best model loaded back
    at the end of a run (dszo/best.py)."""
    meta = meta or read_meta(path)
    method.load_state_dict(SavedState(Reader(path, meta["world_size"]), meta["method_state"]))


def restore(path: Path, meta: dict, method, trainer) -> int:
    """Every rank reads the slices it owns now; returns the step to continue from."""
    restore_method(path, method, meta)
    trainer.load_state_dict(meta)
    RNGState.load_state_dict(meta.get("rng", {}))
    return int(meta["step"])
