"""What the vLLM sampler loads after a LoRA step: the adapters merged in float32 and rounded once to the
engine's dtype. No engine here (``tests/vllm/test_vllm_sampler.py`` runs one): this is about the numbers written.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from opd_runtime.vllm_sampler import trainer_state_dict


def test_lora_merge_rounds_once_in_the_engine_dtype(random_models):
    base = AutoModelForCausalLM.from_pretrained(str(random_models.student), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():  # an early step's adapter: B was zero, so the deltas are about a bf16 ulp of the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2e-4)
    merged = trainer_state_dict(model, torch.bfloat16)
    layers = twice = lost = changed = total = 0
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        w = module.base_layer.weight.detach()
        delta = module.get_delta_weight("default").detach().float()
        once = (w.float() + delta).to(torch.bfloat16)
        assert torch.equal(merged[f"{name}.weight"], once)  # the float32 sum, rounded once
        twice_rounded = w + delta.to(w.dtype)  # the naive merge: the delta rounded to bf16, then added in bf16
        twice += int((twice_rounded != once).sum())
        lost += int(((once == w) & (delta != 0)).sum())
        changed += int((once != w).sum())
        total += w.numel()
        layers += 1
    print(
        f"{layers} LoRA layers, {total} weights: the update shows in {changed}, is below half a bf16 ulp in "
        f"{lost}; the naive double rounding differed from the single rounding in {twice}"
    )
    assert layers > 0 and changed > 0
    assert twice > 0  # the naive merge is off by an ulp somewhere: the test can tell the two apart
