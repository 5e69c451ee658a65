"""Run outputs on the main rank: JSONL metrics (TensorBoard optional), peak memory."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def read_metrics(output_dir: Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl (none when it has none)."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    def __init__(self, output_dir: Path, report_to: list[str], enabled: bool) -> None:
        self.enabled = enabled
        self._f = open(output_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled and "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("report_to: tensorboard needs the `tensorboard` package "
                                   "(pip install tensorboard), or remove it from report_to") from e
            self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
