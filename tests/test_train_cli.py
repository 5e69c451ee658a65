"""dszo/train.py from the command line: bad input gets a clear message and a non-zero exit, and nothing
already written is lost."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, launch, tiny_config

pytestmark = pytest.mark.slow


def test_unknown_override_key_exits_2(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path / "out")
    proc = launch(cfg, 1, "python", extra=["--method.rnak", "4"], check=False, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'method.rnak' (did you mean 'method.rank'?)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_existing_run_is_not_overwritten(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    proc = launch(tiny_config(tiny_model, tiny_data, out), 1, "python", check=False, timeout=120)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "overwrite_output_dir" in proc.stderr
    assert (out / "config.yaml").read_text() == "precious: true\n"
    assert (out / "metrics.jsonl").read_text() == json.dumps({"step": 1}) + "\n"


def test_missing_model_and_batch_mismatch(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path / "a", **{"model.name_or_path": str(tmp_path / "no_model")})
    proc = launch(cfg, 1, "python", check=False, timeout=120)
    assert proc.returncode != 0 and "no_model" in proc.stderr and "Traceback" not in proc.stderr
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3}}))
    proc = launch(tiny_config(tiny_model, tiny_data, tmp_path / "b"), 1, "python",
                  extra=["--deepspeed_config", str(ds)], check=False, timeout=120)
    assert proc.returncode == 2 and "train_micro_batch_size_per_gpu = 3 but the dszo config implies 8" in proc.stderr


def test_signal_during_setup_exits_143_at_once(tiny_model, tiny_data, tmp_path):
    """A job preempted while its model loads stops there (exit 143, as after a step), not at the first step's
    all-reduce minutes later, and not killed by the default handler (which a sweep records as a failure)."""
    cfg = tiny_config(tiny_model, tiny_data, tmp_path / "out")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    preempted_in_setup = f"""
import os, signal, sys
from dszo import cli, trainer
real = trainer.build_run
def build_run(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)   # the signal arrives while the model is being built
    return real(*args, **kwargs)
trainer.build_run = build_run
sys.exit(cli.main(["train", "--config", {str(cfg_path)!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", preempted_in_setup], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "stopped by a signal during set-up" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "latest").exists()
    # what the message says to do works
    launch(cfg, 1, "python", extra=["--overwrite_output_dir", "true"], timeout=120)
    assert (tmp_path / "out" / "results.json").exists()
