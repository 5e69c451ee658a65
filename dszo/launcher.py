"""The launcher's environment: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from whichever launcher started
the process (deepspeed and torchrun set them; srun and mpirun do not), and Slurm node lists as host names.
Plain Python: no torch, so the sbatch scripts can call it before anything heavy is imported.

    python -m dszo.launcher hostnames 'gpu[01-04]'     (the sbatch scripts' fallback when scontrol is missing)
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import Optional


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list like `gpu[001-004,007],cpu01` (scontrol when available)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(3)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def map_launcher_env(env: Optional[dict] = None) -> dict:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR from srun or mpirun.

    deepspeed and torchrun set these themselves. Under `srun` without a launcher (one task per GPU)
    and under `mpirun` they are derived from Slurm's or Open MPI's variables. Returns what was set.
    """
    env = os.environ if env is None else env
    set_: dict = {}
    if "RANK" in env:
        return set_
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        set_ = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]}
        if "MASTER_ADDR" not in env and env.get("SLURM_JOB_NODELIST"):
            set_["MASTER_ADDR"] = expand_slurm_nodelist(env["SLURM_JOB_NODELIST"])[0]
    elif "OMPI_COMM_WORLD_RANK" in env:
        set_ = {"RANK": env["OMPI_COMM_WORLD_RANK"], "WORLD_SIZE": env["OMPI_COMM_WORLD_SIZE"],
                "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                "LOCAL_WORLD_SIZE": env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")}
    elif "PMI_RANK" in env:  # MPICH / Intel MPI
        set_ = {"RANK": env["PMI_RANK"], "WORLD_SIZE": env["PMI_SIZE"],
                "LOCAL_RANK": env.get("MPI_LOCALRANKID", "0"), "LOCAL_WORLD_SIZE": env.get("MPI_LOCALNRANKS", "1")}
    elif "WORLD_SIZE" not in env:  # no launcher at all: one process, which needs no agreed port
        set_ = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port())}
    if set_:
        set_.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
        set_.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
        env.update(set_)
    return set_


def _free_port() -> int:
    """A port free now; two single-process runs on one machine must not both take the default 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size() -> int:
    for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(k):
            return max(1, int(re.match(r"\d+", os.environ[k]).group()))
    return 1


if __name__ == "__main__":   # python -m dszo.launcher hostnames 'gpu[01-04]'  (the sbatch scripts' fallback)
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "hostnames":
        print("\n".join(expand_slurm_nodelist(sys.argv[2])))
    else:
        sys.exit("usage: python -m dszo.launcher hostnames NODELIST")
