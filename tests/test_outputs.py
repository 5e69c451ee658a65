"""dszo/outputs.py: what a resumed run keeps of the interrupted attempt's metrics."""
from __future__ import annotations

import json

from dszo.outputs import _truncate_metrics


def test_a_resumed_run_keeps_every_evaluation_up_to_its_checkpoint(tmp_path):
    logged = [{"event": "setup"}, {"event": "eval", "step": 0}, {"event": "test", "step": 0}, {"step": 10, "loss": 1.0},
              {"event": "checkpoint", "step": 50}, {"step": 60, "loss": 0.9}, {"event": "eval", "step": 100},
              {"event": "test", "step": 100}, {"event": "end", "step": 100}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in logged))
    _truncate_metrics(path, 50)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == logged[:5]    # the test split's step-0 evaluation too: reports draw the test curve from it
