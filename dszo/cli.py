"""dszo's command line: `python -m dszo {train,evaluate,replay,export,sweep}` (also the `dszo` console script, and
`dszo/train.py` as a script). Arguments, config, the process group, and one exit code per outcome:

    0 done   2 configuration or usage   1 data, model, checkpoint or I/O   3 diverged (non-finite losses)
    143 stopped by a signal after saving a checkpoint (resume with --resume_from_checkpoint latest)

Under a launcher the command follows `--module dszo` (deepspeed) or `-m dszo` (torchrun); DeepSpeed's
`--local_rank` may come before the command.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

EXIT_CONFIG = 2
COMMANDS = {
    "train": "fine-tune a model (the config's method, data and DeepSpeed settings)",
    "evaluate": "evaluate a base model (--config) or a finished run (--run) on one split",
    "replay": "rebuild a run's trained tensors from the base model and its replay log",
    "export": "write a finished run as a PEFT adapter or a merged HF model (one process)",
    "sweep": "run a grid of config overrides x seeds, resumably, and summarise it (dszo/sweep.py)",
}
TRAIN_USAGE = """\
    deepspeed --num_gpus 2 dszo/train.py --config configs/rotten_tomatoes_zo_act.yaml [--learning_rate 1e-3 ...]
    torchrun --nproc_per_node 2 dszo/train.py --config ...      mpirun -np 2 python dszo/train.py --config ...
    srun python dszo/train.py --config ...                       (Slurm, one task per GPU)
    python -m dszo train --config ...                            (also: deepspeed --module dszo train ...)

Overrides: any config key as --key value (dotted for sections: --method.rank 4). DeepSpeed's own
arguments are accepted: --local_rank (from the launcher) and --deepspeed_config PATH.
"""


def parse_args(command: str, argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """The command's own arguments; every other `--key value` is a config override."""
    from dszo.config import parse_overrides

    p = argparse.ArgumentParser(prog=f"python -m dszo {command}", description=COMMANDS[command],
                                epilog=TRAIN_USAGE if command == "train" else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run configuration")
    if command == "evaluate":
        p.add_argument("--run", help="a finished run folder: its config.yaml and trained tensors are used")
        p.add_argument("--split", choices=["dev", "test"], default="test")
    if command == "replay":
        p.add_argument("--run", required=True, help="a run folder with replay.jsonl and config.yaml")
        p.add_argument("--steps", type=int, default=0, help="replay only the first N steps (0: up to the model the "
                       "run kept -- the dev-best one with load_best_model_at_end, else all)")
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


def load_command_config(command: str, args: argparse.Namespace, overrides: dict):
    """(config, run folder or None): --run takes the run's own config.yaml, overrides on top."""
    from dszo.config import ConfigError, load_config

    run_dir = Path(args.run) if command != "train" and args.run else None
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: no config.yaml there; name the output_dir of a finished run")
    if command == "evaluate" and bool(args.config) == bool(run_dir):
        raise ConfigError("give either --config (evaluate a base model) or --run (evaluate a finished run with "
                          "its own config.yaml; override keys with --key value)")
    return load_config(str(run_dir / "config.yaml") if run_dir else args.config, overrides), run_dir


def run_command(command: str, argv: list[str]) -> int:
    """Shared by train, evaluate and replay: arguments, config, process group, exit code."""
    from dszo import comm
    from dszo.assets import set_default_extension_dir
    from dszo.config import ConfigError
    from dszo.launcher import map_launcher_env

    fix_glibc_mmap_threshold()
    map_launcher_env()
    set_default_extension_dir()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args, overrides = parse_args(command, argv)
        cfg, run_dir = load_command_config(command, args, overrides)
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"dszo: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    comm.set_cpu_threads()
    return _in_process_group(command, cfg, run_dir, args)


def _in_process_group(command: str, cfg, run_dir: Optional[Path], args: argparse.Namespace) -> int:
    from dszo import comm
    from dszo.config import ConfigError
    from dszo.tasks import DataError
    from dszo.trainer import TrainingStopped

    ok = False
    try:
        comm.init(cfg.ddp_timeout, count_collectives=cfg.log_comm_bytes)
        _run_program(command, cfg, run_dir, args)
        ok = True
        return 0
    except TrainingStopped as e:
        if comm.is_main():
            print(f"dszo: {e}", file=sys.stderr)
        ok = e.together  # every rank stopped at the same step: leave together
        return e.code
    except (ConfigError, DataError, OSError, ValueError) as e:
        print(f"dszo: error (rank {comm.rank()}): {e}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(e, ConfigError) else 1
    finally:
        comm.shutdown() if ok else comm.abandon()


def _run_program(command: str, cfg, run_dir: Optional[Path], args: argparse.Namespace) -> None:
    if command == "train":
        from dszo.trainer import Trainer

        Trainer(cfg).train()
    elif command == "evaluate":
        from dszo.evaluate import evaluate_only

        evaluate_only(cfg, run_dir, args.split)
    else:
        from dszo.replay import replay

        replay(run_dir, cfg, args.steps)


def fix_glibc_mmap_threshold() -> None:
    """Pin glibc's mmap threshold at 1 MiB. Its default grows with every large free, after which activation
    buffers come from the heap and are never returned: RSS grew by ~1 GB per 50-row forward here."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except OSError:
            pass


def exit_now(code: int) -> None:
    """Leave without interpreter finalisation: gloo's worker threads can still hold tensors with Python
    references, and destroying them while the interpreter tears down aborts the rank ("terminate called
    without an active exception", exit -6) even after barrier + destroy_process_group; seen under load.
    Everything dszo writes is closed or flushed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[list[str]] = None) -> int:
    """`dszo COMMAND [args]`; DeepSpeed's launcher may put `--local_rank=N` before the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_args = []
    if argv and argv[0].startswith(("--local_rank", "--local-rank")):   # --local_rank=N or --local_rank N
        launcher_args = argv[:1] if "=" in argv[0] else argv[:2]
    argv = argv[len(launcher_args):]
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m dszo {" + ",".join(COMMANDS) + "} [--help] ...\n\n"
              + "\n".join(f"  {c:<9} {h}" for c, h in COMMANDS.items()), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else EXIT_CONFIG
    command, rest = argv[0], argv[1:] + launcher_args
    if command == "export":  # one process: a launcher's --local_rank means nothing to it
        from dszo.export import main as export_main

        return export_main(argv[1:])
    if command == "sweep":  # a driver: each point is its own `dszo train` process (or launcher)
        return sweep_command(argv[1:])
    return run_command(command, rest)


def sweep_command(argv: list[str]) -> int:
    from dszo import sweep
    from dszo.config import ConfigError

    p = argparse.ArgumentParser(prog="python -m dszo sweep", description=COMMANDS["sweep"])
    p.add_argument("spec", help="the sweep's YAML spec (see README, Sweeps)")
    p.add_argument("--point", type=int, help="run only this point (e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--list", action="store_true", help="list the points and their state")
    p.add_argument("--summary", action="store_true", help="only write the summary table and plot")
    p.add_argument("--kept", metavar="DIR", help="a kept copy of this sweep's summary (DIR/summary.json): the points "
                   "it records as done or diverged are not run again and keep their rows")
    a = p.parse_args(argv)
    try:
        return sweep.main(a.spec, a.point, a.list, a.summary, a.kept)
    except ConfigError as e:
        print(f"dszo sweep: error: {e}", file=sys.stderr)
        return EXIT_CONFIG


def entry() -> None:
    """Console script `dszo`, and `python -m dszo`."""
    exit_now(main())


def train_entry() -> None:
    """Console script `dszo-train` (kept for existing installs): `dszo train`."""
    exit_now(main(["train", *sys.argv[1:]]))
