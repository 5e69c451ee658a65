"""Frozen quantized base weights: bitsandbytes 4-bit (nf4, fp4) and 8-bit (int8), partitioned by ZeRO-3.

transformers quantizes the linear layers while loading (`BitsAndBytesConfig`); deepspeed.initialize then
partitions the quantized tensors like any other parameter -- each rank keeps 1/world of the packed bytes,
ZeRO-3 gathers them around each layer's forward. The 4-bit values are packed into a storage dtype equal to
`model.dtype` (a floating dtype ZeRO-3 partitions and gathers as usual); int8 weights are int8 tensors. The
small quantization statistics (absmax, int8 row scales) stay whole on every rank.

Only methods that never write into W may run on a quantized base: ZO-Act (and the first-order reference on
ZO-Act's coefficients); MeZO, LOZO and AGZO write their updates into W and refuse it
(dszo/methods/base.py: refuse_quantized, from each method's capabilities).
"""
from __future__ import annotations

import torch
from torch import nn

from dszo.errors import QuantizationError

QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")   # bitsandbytes' parameter classes, by name (no import)


def is_quantized(param: torch.Tensor) -> bool:
    return type(param).__name__ in QUANTIZED_PARAM_TYPES


def bnb_config(model_cfg, dtype: torch.dtype):
    """The BitsAndBytesConfig for model.quantization (None for `none`); a clear error where bitsandbytes is
    missing or cannot run here."""
    kind = model_cfg.quantization
    if kind == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:  # the package, or one of its native libraries
        raise QuantizationError(
            f"model.quantization: {kind} needs bitsandbytes, which could not be imported ({e}). Install it into "
            "this environment (`.venv/bin/pip install 'bitsandbytes>=0.50'`, or re-run launch/setup.sh), or set "
            "model.quantization: none") from e
    compute = getattr(torch, model_cfg.compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=model_cfg.double_quant, bnb_4bit_quant_storage=dtype)


def prepare_for_zero3(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights; returns the number of 4-bit layers.

    On CPUs with AVX512-BF16, Linear4bit's first no-grad forward replaces `weight.data` by a repacked copy
    (and marks its quant_state as repacked). Under ZeRO-3 that copy is the *gathered* tensor, which ZeRO-3
    releases after the forward; the next gather brings back the original packing while the quant_state
    still says "repacked" -- silently wrong outputs from the second forward on (design §4). The plain
    kernel path gives the same results without the repacking."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n
