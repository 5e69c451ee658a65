"""Shared by the benchmark scripts: the machine and software a result was measured on."""
from __future__ import annotations

import os
import platform
import sys


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict:
    import deepspeed
    import torch
    import transformers

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (peak RSS) of this process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:   # some sandboxes (gVisor) have no clear_refs: the peak then counts from the start
        pass


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def staged_main(name: str, plan, report, report_options: dict | None = None, **more_stages) -> None:
    """`plan` / `report` stages of a staged benchmark (plan writes sweep specs; report reads their summaries into
    benchmarks/results/<name>.json and .png); `more_stages` are further no-argument stages, by name;
    `report_options` ({name: help}) optional `--name VALUE` flags passed to report as keywords."""
    import argparse
    from pathlib import Path

    stages = {"plan": plan, **more_stages}
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=[*stages, "report"])
    ap.add_argument("--out", default=f"benchmarks/results/{name}.json")
    ap.add_argument("--plot", default=f"benchmarks/results/{name}.png")
    for option, help_ in (report_options or {}).items():
        ap.add_argument(f"--{option}", help=help_)
    a = ap.parse_args()
    if a.stage in stages:
        stages[a.stage]()
    else:
        report(Path(a.out), Path(a.plot), **{option: getattr(a, option) for option in report_options or {}})
