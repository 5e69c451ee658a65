"""Why the orthonormal basis's eps and learning rate mean different things on different models (issue 15).

For every `down_proj` layer of a model: the RMS of the top orthonormal projection vᵀh over the calibration tokens
against the RMS of the layer's own output W h. With orthonormal bases a perturbation εZ of B changes the layer's
output by ~ε·ratio of its size (and an Adam step of lr by ~lr·ratio); `basis_scale: output_rms` makes the ratio 1
in every layer. Plain transformers on the fp32 base, 64 critic sentences of the bundled task in the main job's
prompt, every token counted (no padding: one sentence a forward).

    .venv/bin/python benchmarks/basis_scales.py      -> benchmarks/results/basis_scales.json   (~1 min)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment  # noqa: E402

MODELS = ("bundled:smollm2-135m", "bundled:gemma3-270m")
TEMPLATE, SENTENCES, SEED = "{sentence} It was", 64, 0


def sentences() -> list[str]:
    from dszo.tasks.sources import _bundled_rotten_tomatoes

    examples = _bundled_rotten_tomatoes()
    return [TEMPLATE.format(**e.fields) for e in random.Random(SEED).sample(examples, SENTENCES)]


def layer_ratios(name: str, prompts: list[str]) -> dict[str, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dszo.assets import resolve_model_path

    path = resolve_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sums: dict[str, list] = {}

    def hook(layer: str):
        def record(module, inputs, output):
            h, y = inputs[0].reshape(-1, inputs[0].shape[-1]).double(), output.reshape(-1, output.shape[-1]).double()
            s = sums.setdefault(layer, [0, 0.0, 0.0])
            s[0] += h.shape[0]
            s[1] = s[1] + h.T @ h
            s[2] += float(y.square().mean(1).sum())
        return record

    for layer, module in model.named_modules():
        if layer.endswith("down_proj"):
            module.register_forward_hook(hook(layer))
    with torch.no_grad():
        for p in prompts:
            model(**tok(p, return_tensors="pt"))
    out = {}
    for layer, (tokens, hh, y_sq) in sums.items():
        projection_ms = float(torch.linalg.eigvalsh(hh)[-1]) / tokens
        output_ms = y_sq / tokens
        out[layer] = {"projection_rms": projection_ms ** 0.5, "output_rms": output_ms ** 0.5,
                      "ratio": (projection_ms / output_ms) ** 0.5}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/basis_scales.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts, models = sentences(), {}
    for name in MODELS:
        layers = layer_ratios(name, prompts)
        ratios = [v["ratio"] for v in layers.values()]
        models[name] = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                        "ratio_max": max(ratios), "layers": layers}
        print(f"{name:24} top projection RMS / output RMS over {len(layers)} down_proj layers: median "
              f"{statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}")
    Path(args.out).write_text(json.dumps({"benchmark": "basis_scales", "environment": environment(),
                                          "sentences": SENTENCES, "template": TEMPLATE, "models": models},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
