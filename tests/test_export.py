"""Export: a ZO-Act run as a PEFT LoRA adapter that `peft` loads onto the base model with the same logits, and
as a merged HF model folder; both against an independent reference (forward hooks adding (Vᵀx)ᵀBᵀ)."""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import launch, tiny_config
from tolerances import TINY_FORWARD_REL

import pytest

pytestmark = pytest.mark.slow


def test_peft_adapter_and_merged_model_give_the_run_logits(tiny_model, tiny_data, tmp_path):
    from peft import PeftModel

    from dszo.export import main as export

    run = tmp_path / "run"
    launch(tiny_config(tiny_model, tiny_data, run, max_steps=3, learning_rate=0.05), 1, "python")
    assert export(["--run", str(run), "--format", "peft"]) == 0
    assert export(["--run", str(run), "--format", "merged"]) == 0
    adapter = load_file(str(run / "adapter.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if k.endswith(".zo_B"))

    ids = torch.tensor([[4, 7, 9, 12, 5, 3], [6, 8, 10, 11, 13, 3]])
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for name, mod in ref_model.named_modules():
        if f"{name}.zo_B" in adapter:
            v, b = adapter[f"{name}.zo_V"], adapter[f"{name}.zo_B"]
            mod.register_forward_hook(lambda m, inp, out, v=v, b=b: out + (inp[0] @ v) @ b.T)
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        plain = base(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(run / "export" / "peft")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged", dtype=torch.float32).eval()
        merged_logits = merged(input_ids=ids).logits
    # The same forward with the adapter applied by another route (PEFT's layers; W + B Vᵀ merged): two fp32
    # computations of the tiny Llama's logits.
    allowed = 2 * TINY_FORWARD_REL * max(float(ref.abs().max()), 1.0)
    assert float((plain - ref).abs().max()) > 10 * allowed  # the adapter changes the output: not vacuous
    torch.testing.assert_close(peft_logits, ref, atol=allowed, rtol=0)
    torch.testing.assert_close(merged_logits, ref, atol=allowed, rtol=0)
