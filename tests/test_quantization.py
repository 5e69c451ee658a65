"""Frozen bitsandbytes base weights (nf4, fp4, int8) partitioned by ZeRO-3, with ZO-Act trained on top.

- a 2-rank ZeRO-3 run on the quantized base equals a 1-rank run (I1) and, forward by forward, the plain
  single-process quantized model with the reference's hooks (I2: every step's L+ and L- are separate
  forwards after calibration, so a gather that lost bitsandbytes' CPU repacking would show from the 2nd on);
- each rank holds half of the quantized weight bytes;
- methods that write into W refuse a quantized base with a message that names the alternatives;
- a missing bitsandbytes gives an error that says how to fix it.
"""
from __future__ import annotations

import sys

import pytest
import torch

from compare import assert_matches_reference, assert_same_zo_act_runs, quantization_config
from conftest import OTHER_KERNELS, launch, load_adapter, read_metrics, tiny_config
from test_distributed import GLOBAL_BATCH
from tolerances import forward_rel

KINDS = ["nf4", "fp4", "int8"]
# One step (two separate forwards after calibration): on the 4-bit bases the second step's g is small enough
# that Adam's step is near its rounding bound (tests/tolerances.py), which would leave no useful bound on B.
STEPS = 1

# A quantized forward adds one rounding per weight (dequantization: code × absmax) to each layer's path.
QUANT_FORWARD_REL = forward_rel(64, 8 * 2 + 3 + 2)


@pytest.fixture(scope="module", params=KINDS)
def q_runs(request, tiny_model, tiny_data, tmp_path_factory):
    """1 and 2 ranks (the latter on the scalar kernels), and the exact bases of the quantized model."""
    from reference import ReferenceZOAct

    root = tmp_path_factory.mktemp(f"q_{request.param}")
    for n in (1, 2):
        cfg = tiny_config(tiny_model, tiny_data, root / f"r{n}", max_steps=STEPS,
                          per_device_train_batch_size=GLOBAL_BATCH // n, **{"model.quantization": request.param})
        launch(cfg, n, env=OTHER_KERNELS if n == 2 else None)
    m = cfg["method"]
    ref = ReferenceZOAct(tiny_model, cfg["data"], rank=m["rank"], seed=cfg["seed"], eps=m["zo_eps"],
                         lr=cfg["learning_rate"], quantization=quantization_config(request.param))
    assert any(type(p).__name__ in ("Params4bit", "Int8Params") for p in ref.model.parameters())
    v = ref.compute_bases(m["num_calibration"])
    return request.param, root, {"V": v, "gap_rel": ref.gap_rel, "trace_ratio": ref.trace_ratio}


def _setup(run):
    return next(r for r in read_metrics(run) if r.get("event") == "setup")


@pytest.mark.multirank
@pytest.mark.slow
def test_quantized_I1_one_rank_equals_two_ranks(q_runs):
    """Bases within Davis–Kahan of each other, step 0 directly, and (the next test) each run held to the plain
    quantized model with the reference's hooks on its own basis."""
    _, root, spectrum = q_runs
    assert_same_zo_act_runs(root / "r1", root / "r2", spectrum, QUANT_FORWARD_REL)


@pytest.mark.multirank
@pytest.mark.slow
def test_quantized_zero3_forwards_equal_single_process_quantized_model(q_runs):
    """Every step's L+ and L- are separate forwards after calibration: a gather that lost bitsandbytes' CPU
    repacking would show from the second on. Both runs, each on its own basis."""
    _, root, _ = q_runs
    for run in (root / "r1", root / "r2"):  # 1 rank on this machine's kernels, 2 ranks on the scalar ones
        assert_matches_reference(run, QUANT_FORWARD_REL)


@pytest.mark.multirank
@pytest.mark.slow
def test_each_rank_holds_half_of_the_quantized_weight_bytes(q_runs):
    kind, root, _ = q_runs
    one, two = _setup(root / "r1"), _setup(root / "r2")
    assert one["quantization"] == two["quantization"] == kind
    total = one["quantized_weight_bytes"]
    assert total > 0 and one["quantized_weight_bytes_local"] == total
    # ZeRO-3 pads each tensor's partition to a multiple of the world size: at most one element per tensor.
    assert total / 2 <= two["quantized_weight_bytes_local"] <= total / 2 + 64


@pytest.mark.parametrize("method,extra", [("lozo", {"optim": "sgd"}), ("lozo_m", {"optim": "sgd"}),
                                          ("agzo", {"optim": "sgd"}), ("mezo", {}),
                                          ("first_order", {"method.parameterization": "full"})])
def test_methods_that_write_into_w_refuse_a_quantized_base(method, extra):
    from dszo.config import load_config
    from dszo.quantization import QuantizationError

    over = {"method": {"name": method}, "model": {"quantization": "nf4"}}
    for k, v in extra.items():
        node = over
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    with pytest.raises(QuantizationError, match=rf"method {method} .*model.quantization is nf4.*Use method zo_act"):
        load_config(None, over)
    load_config(None, {**over, "model": {"quantization": "none"}})   # the same method is fine unquantized


@pytest.mark.multirank
def test_mezo_on_a_subset_that_includes_quantized_weights_exits_with_the_alternatives(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path / "run", **{"model.quantization": "int8"})
    cfg["method"] = {"name": "mezo", "trainable": ["*layers.0.mlp.*"]}
    proc = launch(cfg, 1, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "method mezo would write into 3 quantized tensors" in proc.stderr and "['*norm*']" in proc.stderr


def test_missing_bitsandbytes_says_how_to_fix_it(monkeypatch):
    from dszo.config import ModelConfig
    from dszo.quantization import QuantizationError, bnb_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import bitsandbytes -> ImportError
    with pytest.raises(QuantizationError, match=r"needs bitsandbytes.*pip install.*or set model.quantization: none"):
        bnb_config(ModelConfig(quantization="nf4"), torch.float32)
    assert bnb_config(ModelConfig(quantization="none"), torch.float32) is None


def test_cpu_repacking_is_turned_off_on_every_4bit_layer(tiny_model):
    from transformers import AutoModelForCausalLM

    from dszo.config import ModelConfig
    from dszo.quantization import bnb_config, prepare_for_zero3

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                 quantization_config=bnb_config(ModelConfig(quantization="nf4"), torch.float32))
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 14                                 # 7 linear layers x 2 decoder layers
    assert prepare_for_zero3(model) == 14
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)


@pytest.mark.multirank
@pytest.mark.slow
def test_first_order_reference_trains_zo_act_coefficients_on_a_4bit_base(tiny_model, tiny_data, tmp_path):
    """The backprop reference the refusal messages point to: gradients flow through the frozen 4-bit layers."""
    cfg = tiny_config(tiny_model, tiny_data, tmp_path / "fo", max_steps=4, per_device_train_batch_size=4,
                      optim="adam", **{"model.quantization": "nf4"})
    cfg["method"] = {"name": "first_order", "parameterization": "zo_act", "rank": 2, "num_calibration": 16,
                     "calibration_batch_size": 4, "basis_scale": "orthonormal"}   # the units of its lr and bound
    launch(cfg, 2)
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "fo") if r.get("event") == "eval"]
    assert evals[-1] < evals[0] - 0.01
    assert any(float(v.abs().max()) > 0 for k, v in load_adapter(tmp_path / "fo").items() if k.endswith(".zo_B"))
