"""The run folder: what a run writes into its output_dir and what evaluation, replay and export read back.

    config.yaml           the resolved config (written first; a second run into the folder is refused)
    metrics.jsonl         one JSON line per logged step and event (dszo/metrics.py)
    replay.jsonl          (seed, g, lr) per step of a ZO run (dszo/replay.py)
    checkpoint-<step>/    resumable checkpoints, and `latest` (dszo/checkpoint.py)
    adapter.safetensors or trainable.safetensors    the trained tensors (the method's capabilities.result_file)
    results.json          the end-of-run summary
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from dszo import comm
from dszo.config import ConfigError, TrainConfig, dump_yaml


def prepare_output_dir(cfg: TrainConfig, resume_step: int = 0) -> Path:
    """Refuse to write over another run unless asked (or resuming it). Every rank checks first (a collective: the
    main rank must not write before the others have looked), then the main rank writes. On resume, the metrics
    after the checkpoint's step are dropped: those steps run again."""
    out = Path(cfg.output_dir)
    held = (out / "config.yaml").exists() and not cfg.overwrite_output_dir and not resume_step
    if comm.all_max_int(int(held)):
        raise ConfigError(f"output_dir {out} already holds a run (config.yaml): choose another output_dir "
                          "or set overwrite_output_dir: true")
    problem = ""
    if comm.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(out / "metrics.jsonl", resume_step)
            (out / "config.yaml").write_text(dump_yaml(cfg))
        except OSError as e:
            problem = f"cannot write to output_dir {out}: {e.strerror or e}"
            print(f"dszo: error: {problem}", file=sys.stderr)
    if comm.all_max_int(int(bool(problem))):
        raise ConfigError(problem or f"output_dir {out}: the main rank could not write to it (see its error)")
    return out


def _truncate_metrics(path: Path, keep_until_step: int) -> None:
    """A resumed run's metrics: what the interrupted attempt logged up to the checkpoint it resumes from (steps,
    dev and test evaluations, set-ups, checkpoints), not what it logged after (the resumed run logs it again)."""
    if not keep_until_step or not path.exists():
        path.unlink(missing_ok=True)
        return
    records = [(ln, json.loads(ln)) for ln in path.read_text().splitlines()]
    keep = [ln for ln, r in records
            if r.get("event") in ("setup", None, "eval", "test", "checkpoint") and r.get("step", 0) <= keep_until_step]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def save_trained(method, path: Path, cfg: TrainConfig, step: int) -> None:
    """Trained tensors (and fixed ones such as ZO-Act's bases) as one safetensors file, gathered from the
    partitions (collective; the main rank writes)."""
    from safetensors.torch import save_file

    from dszo.zero import gather_full

    tensors = gather_full({**method.trainable(), **method.extra_state()})
    if comm.is_main():
        name = method.capabilities.result_file
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"method": cfg.method.name, "method_config": json.dumps(dataclasses.asdict(cfg.method)),
                            "step": str(step), "base_model": cfg.model.name_or_path})
        os.replace(tmp, path / name)


def result_path(run_dir: Path, cfg: TrainConfig) -> Path:
    """The trained tensors of a finished run folder (a clear error when there are none)."""
    path = run_dir / cfg.method.capabilities().result_file
    if not path.is_file():
        raise ConfigError(f"{path} not found: --run must name a finished run folder of method {cfg.method.name}")
    return path


def load_trained(method, runtime, run_dir: Path, cfg: TrainConfig) -> None:
    """Each rank copies its slice of every trained tensor of a finished run into its partitions."""
    from safetensors import safe_open

    path = result_path(run_dir, cfg)
    with safe_open(str(path), "pt") as f:
        meta, names = f.metadata() or {}, set(f.keys())
        if meta.get("method", cfg.method.name) != cfg.method.name:
            raise ConfigError(f"{path} was trained by method {meta['method']}, the config says {cfg.method.name}")
        for name, param in {**method.trainable(), **method.extra_state()}.items():
            if name not in names:
                raise ConfigError(f"{path} has no tensor {name}: it comes from another model or method config")
            full = f.get_tensor(name)
            part = runtime.partition(name, param)
            if tuple(full.shape) != part.shape:
                raise ConfigError(f"{path}: {name} has shape {tuple(full.shape)}, the model's is {part.shape}")
            part.local.copy_(full.reshape(-1)[part.start:part.end].to(part.local.dtype))


def write_results(out: Path, summary: dict) -> None:
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
