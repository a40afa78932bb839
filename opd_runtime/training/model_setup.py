"""Building the trainable model of a stage (full or LoRA, fresh or resumed) and exporting its output."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import modeling


def build_trainable(init: str, lora, dtype: str, resume_from: Path | None, *, revision: str | None = None,
                    trust_remote_code: bool = False):
    """The model to train: ``init`` weights (or a checkpoint's), wrapped in a LoRA adapter when enabled."""
    full_from_checkpoint = resume_from is not None and not lora.enabled
    model = modeling.load_causal_lm(str(resume_from / "model") if full_from_checkpoint else init, dtype=dtype,
                                    revision=None if full_from_checkpoint else revision,
                                    trust_remote_code=trust_remote_code)
    if lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_from is not None:
            model = PeftModel.from_pretrained(model, resume_from / "model", is_trainable=True)
        else:
            targets = lora.target_modules
            model = get_peft_model(model, LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM"))
    return model


def export_final(model, tokenizer, final: Path, *, lora_enabled: bool) -> Path:
    """Write the stage's output model (LoRA merged into the weights) atomically to ``final``."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out_model = model.merge_and_unload() if lora_enabled else model
    out_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def optimizer_for(params, spec, total_steps: int):
    """AdamW and its schedule from a stage's ``OptimizerSpec``."""
    from .optim import build_optimizer

    return build_optimizer(params, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                           betas=(spec.beta1, spec.beta2), schedule=spec.schedule,
                           warmup_steps=spec.warmup_steps, total_steps=total_steps)
