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
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dszo import comm  # noqa: E402
from dszo.assets import set_default_extension_dir  # noqa: E402
from dszo.config import ConfigError, TrainConfig, dump_yaml, load_config, load_ds_config, parse_overrides  # noqa: E402
from dszo.data import DataError, EncodedSplit, PromptEncoder, StepSampler, load_examples, split  # noqa: E402
from dszo.evaluate import evaluate  # noqa: E402
from dszo.metrics import MetricsWriter, peak_rss_mb  # noqa: E402
from dszo.optim import lr_at  # noqa: E402
from dszo.quantization import quantized_bytes  # noqa: E402

EXIT_CONFIG = 2


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(prog="dszo/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run configuration")
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


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Refuse to write over another run unless asked. Every rank checks first (a collective: the main
    rank must not write before the others have looked), then the main rank writes."""
    out = Path(cfg.output_dir)
    held = (out / "config.yaml").exists() and not cfg.overwrite_output_dir
    if comm.all_max_int(int(held)):
        raise ConfigError(f"output_dir {out} already holds a run (config.yaml): choose another output_dir "
                          "or set overwrite_output_dir: true")
    problem = ""
    if comm.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
            (out / "config.yaml").write_text(dump_yaml(cfg))
        except OSError as e:
            problem = f"cannot write to output_dir {out}: {e.strerror or e}"
            print(f"dszo: error: {problem}", file=sys.stderr)
    if comm.all_max_int(int(bool(problem))):
        raise ConfigError(problem or f"output_dir {out}: the main rank could not write to it (see its error)")
    return out


def build(cfg: TrainConfig, run_seed: int):
    """Data, model under ZeRO-3, method: everything a run needs before its first step."""
    from transformers import AutoTokenizer

    from dszo import engine as zero
    from dszo.assets import resolve_model_path
    from dszo.methods import get_method

    times = {}
    tic = time.perf_counter()
    model_path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    encoder = PromptEncoder(tokenizer, cfg.data)
    parts = split(load_examples(cfg.data), cfg.data.dev_size, cfg.data.test_size, cfg.data.split_seed)
    train, dev = EncodedSplit(encoder, parts["train"]), EncodedSplit(encoder, parts["dev"])

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
    rt = zero.ZeroRuntime(engine, encoder.candidate_ids)
    times["model_s"] = time.perf_counter() - tic - times["data_s"]

    # Calibration examples: the first num_calibration of a seeded order of the training set, split over ranks.
    # Only methods with a calibration phase (ZO-Act's bases) declare num_calibration.
    num_cal = getattr(cfg.method, "num_calibration", 0)
    calib = StepSampler(len(train), num_cal, run_seed).global_indices(0) if num_cal else []
    calib_batches = (train.rank_batches(calib, comm.rank(), comm.world_size(), cfg.method.calibration_batch_size)
                     if num_cal else [])
    method.setup(rt, calib_batches)
    times["method_setup_s"] = time.perf_counter() - tic - times["data_s"] - times["model_s"]
    return train, dev, method, rt, times


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


def train(cfg: TrainConfig) -> dict:
    t_start = time.perf_counter()
    run_seed = comm.broadcast_int(cfg.seed)  # rank 0's seed is the run's seed
    torch.manual_seed(run_seed)
    out = prepare_output_dir(cfg)
    main = comm.is_main()
    metrics = MetricsWriter(out, cfg.report_to, enabled=main)
    train_split, dev, method, rt, build_times = build(cfg, run_seed)
    world = comm.world_size()
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    sampler = StepSampler(len(train_split), micro * accum * world, run_seed)
    counter = comm.COUNTER
    metrics.log({"event": "setup", "world_size": world, "threads": torch.get_num_threads(),
                 "setup_s": time.perf_counter() - t_start, **build_times, "peak_rss_mb": peak_rss_mb(),
                 "trainable_elements_local": sum(s.local.numel() for s in method.shards.values()),
                 "train_examples": len(train_split), "dev_examples": len(dev), "frozen_1d": method.frozen_1d,
                 "quantization": cfg.model.quantization, **quantized_bytes(rt.engine.module)})
    if main and method.frozen_1d:
        tqdm.write(f"[dszo] {len(method.frozen_1d)} 1-D tensors stay frozen (no functional perturbation for their "
                   f"module): {', '.join(method.frozen_1d[:5])}{' ...' if len(method.frozen_1d) > 5 else ''}")

    def run_eval(step: int) -> dict:
        tic = time.perf_counter()
        res = evaluate(rt, dev, cfg.per_device_eval_batch_size)
        metrics.log({"event": "eval", "step": step, "eval_accuracy": res["accuracy"], "eval_loss": res["loss"],
                     "eval_examples": res["num_examples"], "eval_s": time.perf_counter() - tic})
        return res

    before = run_eval(0) if cfg.eval_before_training else None
    if main and before:
        tqdm.write(f"[dszo] dev accuracy before training: {before['accuracy']:.4f} (n={before['num_examples']})")
    bar = tqdm(total=cfg.max_steps, disable=not main or cfg.disable_tqdm, desc=f"{cfg.method.name}", dynamic_ncols=True)
    step_times = []
    for t in range(cfg.max_steps):
        tic = time.perf_counter()
        snap = counter.snapshot() if counter else None
        batches = [train_split.batch(idx) for idx in sampler.rank_micro_batches(t, comm.rank(), world, micro, accum)]
        lr = lr_at(t, cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.max_steps)
        stats = method.step(t, batches, lr, rt)
        step_times.append(time.perf_counter() - tic)
        bar.update(1)
        bar.set_postfix(loss=f"{0.5 * (stats.loss_plus + stats.loss_minus):.4f}")
        if (t + 1) % max(1, cfg.logging_steps) == 0 or t == 0 or t + 1 == cfg.max_steps:
            rec = {"step": t + 1, "loss": 0.5 * (stats.loss_plus + stats.loss_minus), "loss_plus": stats.loss_plus,
                   "loss_minus": stats.loss_minus, "proj_grad": stats.proj_grad, "proj_grads": stats.proj_grads,
                   "lr": lr, "num_examples": stats.num_examples, "step_s": step_times[-1],
                   "tokens_local": int(sum(int(b.token_mask().sum()) for b in batches)),
                   **{f"{k}_s": v for k, v in stats.timings.items()}}
            if counter:
                rec["comm"] = comm.CommCounter.delta(snap, counter.snapshot())
            if cfg.log_memory:
                rec["peak_rss_mb"] = peak_rss_mb()
            metrics.log(rec)
        if cfg.eval_steps and (t + 1) % cfg.eval_steps == 0 and t + 1 != cfg.max_steps:
            run_eval(t + 1)
        if cfg.save_steps and (t + 1) % cfg.save_steps == 0 and t + 1 != cfg.max_steps:
            save_trained(method, out / f"checkpoint-{t + 1}", cfg, t + 1)
    bar.close()
    after = run_eval(cfg.max_steps)
    save_trained(method, out, cfg, cfg.max_steps)
    steady = step_times[1:] or step_times
    summary = {"event": "end", "dev_accuracy_before": before["accuracy"] if before else None,
               "dev_accuracy_after": after["accuracy"], "dev_loss_after": after["loss"], "steps": cfg.max_steps,
               "mean_step_s": sum(steady) / len(steady) if steady else None, "world_size": world,
               "wall_s": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb()}
    metrics.log(summary)
    metrics.close()
    if main:
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        tqdm.write(f"[dszo] dev accuracy after {cfg.max_steps} steps: {after['accuracy']:.4f}; outputs in {out}")
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


def main(argv=None) -> int:
    _fix_glibc_mmap_threshold()
    comm.map_launcher_env()
    set_default_extension_dir()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args, overrides = parse_args(argv)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"dszo: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    comm.set_cpu_threads()
    ok = False
    try:
        comm.init(cfg.ddp_timeout, count_collectives=cfg.log_comm_bytes)
        train(cfg)
        ok = True
        return 0
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


def cli() -> None:
    """Console entry point (`dszo-train`)."""
    _exit(main())


if __name__ == "__main__":
    cli()
