"""Carry a finished run to the tools people already use (one process, no DeepSpeed):

    python -m dszo export --run runs/rotten_tomatoes_zo_act --format peft    # -> <run>/export/peft
    python -m dszo export --run runs/rotten_tomatoes_zo_act --format merged  # -> <run>/export/merged

- `peft`: ZO-Act's layer computes W x + B (Vᵀ x), which is LoRA with lora_A = Vᵀ, lora_B = B and scaling 1
  (lora_alpha = r): an adapter folder (adapter_config.json + adapter_model.safetensors) that
  `PeftModel.from_pretrained(base, folder)` loads onto the base model with the same logits.
- `merged`: an HF model folder (safetensors + tokenizer) with the trained change folded into the weights:
  W + B Vᵀ for ZO-Act, the trained tensors themselves for MeZO / LOZO / AGZO. It needs an unquantized base
  (a 4-/8-bit W cannot hold W + B Vᵀ exactly): export the adapter instead.
Which formats a run allows follows from its method's capabilities (exports_adapter, result_file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dszo.config import ConfigError, load_config
from dszo.outputs import result_path

ADAPTER_SUFFIXES = (".zo_B", ".zo_V")


def load_run(run: Path):
    """(config, trained tensors) of a finished run (also read by benchmarks/basis_drift.py)."""
    from safetensors import safe_open

    cfg = load_config(str(run / "config.yaml"))
    path = result_path(run, cfg)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cfg, tensors


def lora_pairs(tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (lora_A = Vᵀ [r, in], lora_B = B [out, r])."""
    mods = sorted({k[:-len(".zo_B")] for k in tensors if k.endswith(".zo_B")})
    return {m: (tensors[f"{m}.zo_V"].T.contiguous(), tensors[f"{m}.zo_B"].contiguous()) for m in mods}


def export_peft(run: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    from dszo.assets import resolve_model_path

    cfg, tensors = load_run(run)
    if not cfg.method.capabilities().exports_adapter:
        raise ConfigError(f"method {cfg.method.name} trains the weights themselves, not an adapter: use --format merged")
    pairs = lora_pairs(tensors)
    r = next(iter(pairs.values()))[0].shape[0]
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for m, (a, b) in pairs.items():
        weights[f"base_model.model.{m}.lora_A.weight"] = a
        weights[f"base_model.model.{m}.lora_B.weight"] = b
    save_file(weights, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
              "target_modules": sorted(pairs), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": str(resolve_model_path(cfg.model.name_or_path)),
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def export_merged(run: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dszo.assets import resolve_model_path

    cfg, tensors = load_run(run)
    if cfg.model.quantization != "none":
        raise ConfigError(f"the run's base is {cfg.model.quantization}-quantized: W + B Vᵀ cannot be stored in it "
                          "exactly; export the adapter (--format peft) and load it onto the base")
    base = resolve_model_path(cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m, (a, b) in lora_pairs(tensors).items():
            params[f"{m}.weight"].add_(b @ a)
        for name, t in tensors.items():
            if not name.endswith(ADAPTER_SUFFIXES):
                key = name.replace(".base.weight", ".weight").replace(".base.bias", ".bias")
                if key not in params:
                    raise ConfigError(f"trained tensor {name} has no parameter {key} in {base}")
                params[key].copy_(t)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dszo export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run folder")
    p.add_argument("--format", choices=["peft", "merged"], required=True)
    p.add_argument("--out", help="destination folder (default <run>/export/<format>)")
    args = p.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "export" / args.format
    try:
        done = (export_peft if args.format == "peft" else export_merged)(run, out)
    except (ConfigError, OSError) as e:
        print(f"dszo: export error: {e}", file=sys.stderr)
        return 2
    print(f"[dszo] exported {run} as {args.format}: {done}")
    return 0



if __name__ == "__main__":  # the scripts of earlier versions: say what replaced them, do not succeed silently
    import sys

    sys.exit("dszo/export.py is no longer a script: run python -m dszo export ... "
             "(under a launcher: deepspeed --module dszo export ...)")
