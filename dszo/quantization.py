"""Frozen quantized base weights: bitsandbytes 4-bit (nf4, fp4) and 8-bit (int8), partitioned by ZeRO-3.

transformers quantizes the linear layers while loading (`BitsAndBytesConfig`); deepspeed.initialize then
partitions the quantized tensors like any other parameter -- each rank keeps 1/world of the packed bytes,
ZeRO-3 gathers them around each layer's forward. The 4-bit values are packed into a storage dtype equal to
`model.dtype` (a floating dtype ZeRO-3 partitions and gathers as usual); int8 weights are int8 tensors. The
small quantization statistics (absmax, int8 row scales) stay whole on every rank.

Only methods that never write into W may run on a quantized base: ZO-Act (and the first-order reference on
ZO-Act's coefficients); MeZO, LOZO and AGZO write their updates into W and refuse it (see `refuse`).
"""
from __future__ import annotations

import torch
from torch import nn

from dszo.config import ConfigError

QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")   # bitsandbytes' parameter classes, by name (no import)


class QuantizationError(ConfigError):
    pass


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


def quantized_bytes(model: nn.Module) -> dict:
    """Bytes of the quantized weights: whole tensors and this rank's ZeRO-3 partitions (after initialize)."""
    total = local = 0
    for p in model.parameters():
        if not is_quantized(p):
            continue
        shape = getattr(p, "ds_shape", p.shape)
        total += int(torch.Size(shape).numel()) * p.element_size()
        part = getattr(p, "ds_tensor", None)
        local += (part.numel() if part is not None else p.numel()) * p.element_size()
    return {"quantized_weight_bytes": total, "quantized_weight_bytes_local": local}


def refuse(method: str, quantization: str, how: str) -> None:
    """The error of a method that would write into frozen quantized weights."""
    if quantization == "none":
        return
    subset = "restrict method.trainable to unquantized tensors (e.g. ['*norm*']), " if method in ("mezo", "first_order") else ""
    raise QuantizationError(
        f"method {method} {how}, but model.quantization is {quantization}: the base weights are frozen "
        f"{quantization} and cannot take an update. Use method zo_act (trains coefficients on top of the frozen "
        f"quantized weights; first_order with parameterization: zo_act is its backprop reference), {subset}"
        "or set model.quantization: none")
