"""dszo/train.py from the command line: bad input gets a clear message and a non-zero exit, and nothing
already written is lost."""
import json

import pytest

from conftest import launch, tiny_config

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
