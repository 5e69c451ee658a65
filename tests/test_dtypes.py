"""A bf16 frozen base: ZO-Act's coefficients, bases and Adam moments stay fp32 (the base's rounding would swallow
an update of B: lr·g·z ~ 1e-4 against bf16's 2^-8 relative step), on 2 ranks under ZeRO-3."""
import json
import math

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import launch, step_records, tiny_config

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


def test_bf16_base_with_fp32_coefficients_and_optimiser_state(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "bf16"
    launch(tiny_config(tiny_model, tiny_data, out, max_steps=2, save_steps=2, per_device_train_batch_size=4,
                       **{"model.dtype": "bfloat16"}), 2)
    steps = step_records(out)
    assert len(steps) == 2 and all(math.isfinite(s["loss_plus"]) and math.isfinite(s["loss_minus"]) for s in steps)
    trained = load_file(str(out / "adapter.safetensors"))
    assert {str(t.dtype) for t in trained.values()} == {"torch.float32"}
    assert any(float(t.abs().max()) > 0 for k, t in trained.items() if k.endswith(".zo_B"))  # B moved
    with safe_open(str(out / "checkpoint-2" / "rank00000-of-00002.safetensors"), "pt") as f:
        index = json.loads(f.metadata()["dszo_index"])
        moments = [k for k in index if k.endswith(("::exp_avg", "::exp_avg_sq"))]
        assert moments and {str(f.get_slice(k).get_dtype()) for k in moments} == {"F32"}
