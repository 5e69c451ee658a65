"""dszo training entry point.

    deepspeed --num_gpus 2 dszo/train.py --config configs/rotten_tomatoes_zo_act.yaml [--learning_rate 1e-3 ...]
    torchrun --nproc_per_node 2 dszo/train.py --config ...      mpirun -np 2 python dszo/train.py --config ...
    srun python dszo/train.py --config ...                       (Slurm, one task per GPU)

Overrides: any config key as --key value (dotted for sections: --method.rank 4). DeepSpeed's own
arguments are accepted: --local_rank (from the launcher) and --deepspeed_config PATH.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dszo import comm  # noqa: E402
from dszo.assets import set_default_extension_dir  # noqa: E402
from dszo.config import (ConfigError, TrainConfig, dump_yaml, load_config, load_ds_config, parse_overrides,  # noqa: E402
                         to_dict)
from dszo.data import EncodedSplit, PromptEncoder, StepSampler  # noqa: E402
from dszo.evaluate import Generation, evaluate, headline  # noqa: E402
from dszo.metrics import MetricsWriter, peak_rss_mb  # noqa: E402
from dszo.optim import lr_at  # noqa: E402
from dszo.quantization import quantized_bytes  # noqa: E402
from dszo.tasks import DataError  # noqa: E402

EXIT_CONFIG = 2
EXIT_DIVERGED = 3      # too many non-finite losses in a row (a checkpoint was saved)
EXIT_STOPPED = 143     # 128 + SIGTERM: stopped by a signal after saving a checkpoint; resume to continue


def parse_args(argv=None, mode: str = "train") -> tuple[argparse.Namespace, dict]:
    import importlib

    doc = __doc__ if mode == "train" else importlib.import_module(f"dszo.{mode}").__doc__
    p = argparse.ArgumentParser(prog=f"dszo/{mode}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run configuration")
    if mode == "evaluate":
        p.add_argument("--run", help="a finished run folder: its config.yaml and trained tensors are used")
        p.add_argument("--split", choices=["dev", "test"], default="test")
    if mode == "replay":
        p.add_argument("--run", required=True, help="a run folder with replay.jsonl and config.yaml")
        p.add_argument("--steps", type=int, default=0, help="replay only the first N steps (0: all)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON (overrides the config's `deepspeed:`)")
    p.add_argument("--deepspeed", nargs="?", const=True, default=None,
                   help="DeepSpeed's flag; given a .json path, the same as --deepspeed_config")
    args, rest = p.parse_known_args(argv)
    overrides = parse_overrides(rest)
    ds_path = args.deepspeed_config or (args.deepspeed if isinstance(args.deepspeed, str) else None)
    if ds_path:
        overrides["deepspeed"] = ds_path
    return args, overrides


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
    if not keep_until_step or not path.exists():
        path.unlink(missing_ok=True)
        return
    records = [(ln, json.loads(ln)) for ln in path.read_text().splitlines()]
    keep = [ln for ln, r in records
            if r.get("event") in ("setup", None, "eval", "checkpoint") and r.get("step", 0) <= keep_until_step]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


class TaskData:
    """The task's examples, its encoder, and the encoded splits a run or an evaluation needs (made on demand)."""

    def __init__(self, cfg: TrainConfig) -> None:
        from transformers import AutoTokenizer

        from dszo.assets import resolve_model_path
        from dszo.tasks import get_task, load_splits

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                                       trust_remote_code=cfg.model.trust_remote_code)
        self.task = get_task(cfg.data)
        self.parts = load_splits(cfg.data, self.task)
        self.encoder = PromptEncoder(self.tokenizer, self.task, cfg.data)
        d = cfg.data
        self.generation = Generation(self.tokenizer, d.max_new_tokens, d.stop) if self.task.generation else None

    def train_split(self) -> EncodedSplit:
        return EncodedSplit(self.encoder, self.parts["train"], "train")

    def eval_split(self, name: str) -> EncodedSplit:
        d = self.cfg.data
        return EncodedSplit(self.encoder, self.parts[name], "eval", d.num_demos, self.parts["train"], d.split_seed)

    def scorer(self):
        from dszo.scoring import Scorer

        return Scorer(self.encoder.candidate_ids, self.cfg.data.loss, self.cfg.data.scoring)


def build(cfg: TrainConfig, run_seed: int, training: bool = True, calibrate: bool = True):
    """Data, model under ZeRO-3, method: everything a run needs before its first step."""
    from dszo import engine as zero
    from dszo.methods import get_method

    times = {}
    tic = time.perf_counter()
    data = TaskData(cfg)
    train = data.train_split() if training else None
    times["data_s"] = time.perf_counter() - tic
    ds_config = load_ds_config(cfg.deepspeed, cfg, comm.world_size())
    partition, num_nodes = comm.node_partition(
        cfg.ddp_timeout, per_node=cfg.partition != "world" and cfg.method.name != "first_order")
    if partition is not None:
        # DeepSpeed checks train_batch_size against its data-parallel size, here the node's ranks, not the world;
        # without the key it derives its own from micro batch x accumulation (dszo's sampler uses the world).
        ds_config.pop("train_batch_size")
    times["partition"] = {"mode": "node" if partition else "world", "num_nodes": num_nodes,
                          "group_size": partition.get_data_parallel_world_size() if partition else comm.world_size()}
    method = get_method(cfg.method.name)(cfg, run_seed)
    model = zero.load_model(cfg, ds_config, partition)
    method.attach(model)
    engine = zero.initialize(model, ds_config, method.torch_optimizer(), partition)
    rt = zero.ZeroRuntime(engine, data.scorer())
    times["model_s"] = time.perf_counter() - tic - times["data_s"]
    if not training:
        return data, None, method, rt, times

    # Calibration examples: the first num_calibration of a seeded order of the training set, split over ranks.
    # Only methods with a calibration phase (ZO-Act's bases) declare num_calibration.
    num_cal = getattr(cfg.method, "num_calibration", 0) if calibrate else 0  # a resume loads the bases instead
    calib = StepSampler(len(train), num_cal, run_seed).global_indices(0) if num_cal else []
    calib_batches = (train.rank_batches(calib, comm.rank(), comm.world_size(), cfg.method.calibration_batch_size)
                     if num_cal else [])
    method.setup(rt, calib_batches if calibrate else None)
    times["method_setup_s"] = time.perf_counter() - tic - times["data_s"] - times["model_s"]
    return data, train, method, rt, times


def save_trained(method, path: Path, cfg: TrainConfig, step: int) -> None:
    """Trained coefficients (and bases) as one safetensors file, gathered from the shards."""
    from safetensors.torch import save_file

    from dszo.engine import gather_full

    tensors = gather_full({**method.trainable(), **method.extra_state()})
    if comm.is_main():
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{method.result_file}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"method": cfg.method.name, "method_config": json.dumps(dataclasses.asdict(cfg.method)),
                            "step": str(step), "base_model": cfg.model.name_or_path})
        os.replace(tmp, path / method.result_file)


class TrainingStopped(RuntimeError):
    """The run stopped before max_steps (a signal, or too many non-finite losses), after saving a checkpoint."""

    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg)
        self.code = code


def _install_stop_handlers(rt) -> None:
    """SIGTERM (Slurm's preemption and time limit) and SIGINT set a flag; the step's all-reduce carries it, so
    every rank stops after the same step, saves a checkpoint and exits."""
    def handler(signum, frame):
        rt.stop_requested = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _resume_point(cfg: TrainConfig):
    """(checkpoint folder, its metadata) for resume_from_checkpoint, checked against this run; or None."""
    if not cfg.resume_from_checkpoint:
        return None
    from dszo import checkpoint as ckpt

    if cfg.method.name == "first_order":
        raise ConfigError("first_order runs cannot be resumed: their optimiser state lives in DeepSpeed's training "
                          "engine, which dszo's checkpoints do not hold")
    path = ckpt.resolve(Path(cfg.output_dir), cfg.resume_from_checkpoint)
    meta = ckpt.read_meta(path)
    ckpt.check_compatible(meta, to_dict(cfg), comm.world_size(), path)
    return path, meta


def train(cfg: TrainConfig) -> dict:
    from dszo import checkpoint as ckpt
    from dszo.directions import step_seed
    from dszo.replay import FORMAT as REPLAY_FORMAT, ReplayLog

    t_start = time.perf_counter()
    run_seed = comm.broadcast_int(cfg.seed)  # rank 0's seed is the run's seed
    torch.manual_seed(run_seed)
    resume = _resume_point(cfg)
    out = prepare_output_dir(cfg, resume_step=resume[1]["step"] if resume else 0)
    main = comm.is_main()
    metrics = MetricsWriter(out, cfg.report_to, enabled=main)
    data, train_split, method, rt, build_times = build(cfg, run_seed, calibrate=resume is None)
    tic = time.perf_counter()
    start = ckpt.restore(*resume, method, rt) if resume else 0
    build_times["restore_s"] = time.perf_counter() - tic
    replay = ReplayLog(out, {"format": REPLAY_FORMAT, "run_seed": run_seed, "method": cfg.method.name,
                             "config": to_dict(cfg)}, start, enabled=main and cfg.replay_log)
    _install_stop_handlers(rt)
    dev = data.eval_split("dev")
    world = comm.world_size()
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    sampler = StepSampler(len(train_split), micro * accum * world, run_seed)
    counter = comm.COUNTER
    metrics.log({"event": "setup", "world_size": world, "threads": torch.get_num_threads(),
                 "setup_s": time.perf_counter() - t_start, **build_times, "peak_rss_mb": peak_rss_mb(),
                 "trainable_elements_local": sum(s.local.numel() for s in method.shards.values()),
                 "task": data.task.name, "train_examples": len(train_split), "dev_examples": len(dev),
                 "test_examples": len(data.parts["test"]), "frozen_1d": method.frozen_1d, "resumed_from_step": start,
                 "quantization": cfg.model.quantization, **quantized_bytes(rt.engine.module)})
    if main and method.frozen_1d:
        tqdm.write(f"[dszo] {len(method.frozen_1d)} 1-D tensors stay frozen (no functional perturbation for their "
                   f"module): {', '.join(method.frozen_1d[:5])}{' ...' if len(method.frozen_1d) > 5 else ''}")

    def run_eval(step: int, split=dev, prefix: str = "eval") -> dict:
        res = evaluate(rt, split, cfg.per_device_eval_batch_size, data.generation)
        metrics.log({"event": prefix, "step": step,
                     **{f"{prefix}_s" if k == "eval_s" else f"{prefix}_{k}": v for k, v in res.items()}})
        return res

    def save(step: int) -> Path:
        tic = time.perf_counter()
        path = ckpt.save(out, step, method, rt, {"run_seed": run_seed, "config": to_dict(cfg), "rng": ckpt.rng_state(),
                                                 "data": {"next_step": step, "global_batch": sampler.global_batch}},
                         cfg.save_total_limit)
        metrics.log({"event": "checkpoint", "step": step, "path": str(path), "save_s": time.perf_counter() - tic})
        return path

    before = run_eval(0) if cfg.eval_before_training and start == 0 else None
    if main and before:
        tqdm.write(f"[dszo] dev {headline(before)} before training (n={before['num_examples']})")
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not main or cfg.disable_tqdm, desc=f"{cfg.method.name}",
               dynamic_ncols=True)
    step_times, bad_in_a_row, skipped = [], 0, 0
    for t in range(start, cfg.max_steps):
        tic = time.perf_counter()
        snap = counter.snapshot() if counter else None
        batches = [train_split.batch(idx) for idx in sampler.rank_micro_batches(t, comm.rank(), world, micro, accum)]
        lr = lr_at(t, cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.max_steps)
        stats = method.step(t, batches, lr, rt)
        step_times.append(time.perf_counter() - tic)
        replay.append(t + 1, step_seed(run_seed, t), stats)
        bad_in_a_row, skipped = (bad_in_a_row + 1, skipped + 1) if stats.skipped else (0, skipped)
        bar.update(1)
        bar.set_postfix(loss=f"{0.5 * (stats.loss_plus + stats.loss_minus):.4f}")
        if (t + 1) % max(1, cfg.logging_steps) == 0 or t == start or t + 1 == cfg.max_steps or stats.skipped:
            rec = {"step": t + 1, "loss": 0.5 * (stats.loss_plus + stats.loss_minus), "loss_plus": stats.loss_plus,
                   "loss_minus": stats.loss_minus, "proj_grad": stats.proj_grad, "proj_grads": stats.proj_grads,
                   "lr": lr, "num_examples": stats.num_examples, "step_s": step_times[-1],
                   "tokens_local": int(sum(int(b.token_mask().sum()) for b in batches)),
                   "skipped": stats.skipped, "skipped_total": skipped, **{f"{k}_s": v for k, v in stats.timings.items()}}
            if counter:
                rec["comm"] = comm.CommCounter.delta(snap, counter.snapshot())
            if cfg.log_memory:
                rec["peak_rss_mb"] = peak_rss_mb()
            metrics.log(rec)
        if cfg.max_bad_steps and bad_in_a_row >= cfg.max_bad_steps:
            path = save(t + 1)
            raise TrainingStopped(f"{bad_in_a_row} steps in a row had a non-finite loss (last: L+ = {stats.loss_plus}, "
                                  f"L- = {stats.loss_minus}); stopped at step {t + 1} with a checkpoint in {path}. "
                                  "Lower learning_rate or method.zo_eps, or check the data", EXIT_DIVERGED)
        if cfg.eval_steps and (t + 1) % cfg.eval_steps == 0 and t + 1 != cfg.max_steps:
            run_eval(t + 1)
        if rt.stop_agreed and t + 1 != cfg.max_steps:
            path = save(t + 1)
            raise TrainingStopped(f"stopped by a signal after step {t + 1}; checkpoint in {path}. Continue with "
                                  "--resume_from_checkpoint latest", EXIT_STOPPED)
        if cfg.save_steps and (t + 1) % cfg.save_steps == 0:
            save(t + 1)
    bar.close()
    replay.close()
    after = run_eval(cfg.max_steps)
    test = run_eval(cfg.max_steps, data.eval_split("test"), "test") if cfg.do_predict else None
    save_trained(method, out, cfg, cfg.max_steps)
    steady = step_times[1:] or step_times
    summary = {"event": "end", **{f"dev_{k}_before": v for k, v in (before or {}).items() if k != "eval_s"},
               **{f"dev_{k}_after": v for k, v in after.items() if k != "eval_s"},
               **{f"test_{k}": v for k, v in (test or {}).items()}, "steps": cfg.max_steps, "resumed_from_step": start,
               "skipped_steps": skipped, "mean_step_s": sum(steady) / len(steady) if steady else None,
               "world_size": world, "wall_s": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb()}
    metrics.log(summary)
    metrics.close()
    if main:
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        tqdm.write(f"[dszo] dev {headline(after)} after {cfg.max_steps} steps"
                   + (f"; test {headline(test)}" if test else "") + f"; outputs in {out}")
    return summary


def _fix_glibc_mmap_threshold() -> None:
    """Pin glibc's mmap threshold at 1 MiB. Its default grows with every large free, after which activation
    buffers come from the heap and are never returned: RSS grew by ~1 GB per 50-row forward here."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except OSError:
            pass


def run_cli(argv=None, mode: str = "train") -> int:
    """Shared by dszo/train.py, dszo/evaluate.py and dszo/replay.py: arguments, config, process group, exit code."""
    _fix_glibc_mmap_threshold()
    comm.map_launcher_env()
    set_default_extension_dir()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args, overrides = parse_args(argv, mode)
        run_dir = Path(args.run) if mode != "train" and args.run else None
        if run_dir is not None and not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--run {run_dir}: no config.yaml there; name the output_dir of a finished run")
        if mode == "evaluate" and bool(args.config) == bool(run_dir):
            raise ConfigError("give either --config (evaluate a base model) or --run (evaluate a finished run with "
                              "its own config.yaml; override keys with --key value)")
        cfg = load_config(str(run_dir / "config.yaml") if run_dir else args.config, overrides)
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"dszo: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    comm.set_cpu_threads()
    ok = False
    try:
        comm.init(cfg.ddp_timeout, count_collectives=cfg.log_comm_bytes)
        if mode == "train":
            train(cfg)
        elif mode == "evaluate":
            from dszo.evaluate import evaluate_only

            evaluate_only(cfg, run_dir, args.split)
        else:
            from dszo.replay import replay

            replay(run_dir, cfg, args.steps)
        ok = True
        return 0
    except TrainingStopped as e:
        if comm.is_main():
            print(f"dszo: {e}", file=sys.stderr)
        ok = True  # every rank stopped at the same step: leave together
        return e.code
    except (ConfigError, DataError, OSError, ValueError) as e:
        print(f"dszo: error (rank {comm.rank()}): {e}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(e, ConfigError) else 1
    finally:
        if ok:
            comm.shutdown()
        elif comm.is_initialized():
            torch.distributed.destroy_process_group()


def _exit(code: int) -> None:
    """Leave without interpreter finalisation: gloo's worker threads can still hold tensors with Python
    references, and destroying them while the interpreter tears down aborts the rank ("terminate called
    without an active exception", exit -6) even after barrier + destroy_process_group; seen under load.
    Everything dszo writes is closed or flushed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    return run_cli(argv, "train")


def cli() -> None:
    """Console entry point (`dszo-train`)."""
    _exit(main())


if __name__ == "__main__":
    cli()
