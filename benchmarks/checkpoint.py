"""Checkpoint figures for ZO-Act on the bundled model (SmolLM2-135M, nf4 or fp32 base) on 2 ranks: checkpoint
size and save / restore time, replay-log bytes per 1,000 steps, and the time from a killed rank to the job's exit.

    .venv/bin/python benchmarks/checkpoint.py [--config configs/rotten_tomatoes_zo_act.yaml] [--extra "..."]

-> benchmarks/results/checkpoint.json (hardware, versions, command). Run alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cmd(args, out: Path, *extra) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "dszo/train.py", "--config", args.config,
            "--output_dir", str(out), "--overwrite_output_dir", "true", "--eval_before_training", "false",
            "--disable_tqdm", "true", "--data.dev_size", "16", "--logging_steps", "1", "--save_total_limit", "0",
            "--direction_groups", "1",   # as its committed results were measured
            *args.extra.split(), *extra]


def _run(cmd) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/rotten_tomatoes_zo_act.yaml")
    ap.add_argument("--extra", default="", help="more train.py overrides")
    ap.add_argument("--out", default="benchmarks/results/checkpoint.json")
    args = ap.parse_args()
    from benchmarks.common import environment

    root = REPO / "runs" / "bench_checkpoint"
    res = {}
    # 1. save: 6 steps, a checkpoint every 2
    _run(_cmd(args, root / "full", "--max_steps", "6", "--save_steps", "2"))
    recs = _records(root / "full")
    ck = root / "full" / "checkpoint-4"
    res["checkpoint_bytes"] = {p.name: p.stat().st_size for p in sorted(ck.iterdir())}
    res["checkpoint_total_mb"] = sum(res["checkpoint_bytes"].values()) / 2**20
    res["save_s"] = [r["save_s"] for r in recs if r.get("event") == "checkpoint"]
    log = (root / "full" / "replay.jsonl").read_text().splitlines()
    per_step = sum(len(x) + 1 for x in log[1:]) / (len(log) - 1)
    res["replay_log"] = {"header_bytes": len(log[0]) + 1, "bytes_per_step": per_step,
                         "kib_per_1000_steps": per_step * 1000 / 1024}
    # 2. restore: resume from checkpoint-4 (same world size), 2 more steps
    _run(_cmd(args, root / "full", "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint",
              str(ck)))
    setup = [r for r in _records(root / "full") if r.get("event") == "setup"][-1]
    res["restore_s"] = setup["restore_s"]
    res["setup_s_resumed"] = setup["setup_s"]
    # 3. a killed rank: time from SIGKILL to the launcher's exit
    cmd = _cmd(args, root / "kill", "--max_steps", "40", "--save_steps", "2", "--ddp_timeout", "120")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = root / "kill" / "metrics.jsonl"
    while not (metrics.exists() and any(json.loads(x).get("step", 0) >= 3 and "event" not in json.loads(x)
                                        for x in metrics.read_text().splitlines())):
        time.sleep(0.2)
    pids = subprocess.run(["pgrep", "-f", "--", "--local_rank=1"], capture_output=True, text=True).stdout.split()
    tic = time.perf_counter()
    os.kill(int(pids[0]), signal.SIGKILL)
    proc.wait()
    res["killed_rank_to_exit_s"] = time.perf_counter() - tic
    res["killed_job_exit_code"] = proc.returncode
    env = environment()
    env["command"] = "python " + " ".join(sys.argv)
    Path(args.out).write_text(json.dumps({"environment": env, "config": args.config, "extra": args.extra, **res},
                                         indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
