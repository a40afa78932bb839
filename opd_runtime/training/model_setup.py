"""Building the trainable model of a stage (full or LoRA, fresh or resumed) and exporting its output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import modeling
from . import distributed, sharding
from .precision import attach, export_state_dict, precision_of, training_precision


def build_trainable(
    init: str,
    lora,
    dtype: str,
    resume_from: Path | None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    strategy: str = "auto",
):
    """The model to train: ``init`` weights (or a checkpoint's), wrapped in a LoRA adapter when enabled,
    under the stage's precision policy (float32 masters, bf16 compute on GPUs: ``precision``) and, with
    ``strategy`` resolving to fsdp, sharded over the processes (``sharding``). Every rank starts from the
    same weights (rank 0's for fresh LoRA adapters)."""
    dev = modeling.device()
    precision = training_precision(dtype, dev)
    fsdp = sharding.resolve_strategy(strategy, lora=lora.enabled, world=distributed.world_size()) == "fsdp"
    # a sharded checkpoint (dcp/) has no model/ folder: the weights come with the optimizer in restore()
    saved = resume_from / "model" if resume_from is not None and not lora.enabled else None
    full_from_checkpoint = saved is not None and saved.is_dir()
    model = modeling.load_causal_lm(
        str(saved) if full_from_checkpoint else init,
        dtype=dtype,
        revision=None if full_from_checkpoint else revision,
        trust_remote_code=trust_remote_code,
        # LoRA: the frozen base stays in the spec dtype; full: float32 masters
        load_dtype=precision.frozen if lora.enabled else precision.master,
        # FSDP moves each shard to the device, never the whole model
        dev=torch.device("cpu") if fsdp else dev,
    )
    if lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_from is not None:
            model = PeftModel.from_pretrained(model, resume_from / "model", is_trainable=True)
        else:
            targets = lora.target_modules
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=targets[0] if targets == ["all-linear"] else targets,
                    task_type="CAUSAL_LM",
                ),
            )
    if fsdp:
        return sharding.shard(model, precision, dev)
    distributed.broadcast_parameters(model)
    return attach(model, precision, dev)


def export_final(model, tokenizer, final: Path, *, lora_enabled: bool) -> Path | None:
    """Write the stage's output model (LoRA merged into the weights) atomically to ``final``, in the
    spec dtype. A collective for a sharded model (every rank calls it; rank 0 writes, others get None)."""
    precision = precision_of(model)
    state: dict[str, torch.Tensor] | None
    if sharding.is_sharded(model):
        state = sharding.full_state_dict(model)  # every rank takes part; rank 0 gets the weights
        if not distributed.is_main():
            return None
        out_model, state = model, export_state_dict(state, precision)
    else:
        out_model = model.merge_and_unload() if lora_enabled else model
        # float32 masters are exported in the spec dtype (bf16 on GPUs); float32 runs write as they are
        state = export_state_dict(out_model.state_dict(), precision) if precision.export != precision.master else None
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state is not None:
        # as save_pretrained() leaves them out by itself: tied copies (the output head of tied embeddings)
        for tied in getattr(out_model, "all_tied_weights_keys", None) or {}:
            state.pop(tied, None)
    out_model.save_pretrained(tmp, state_dict=state)
    if state is not None:  # config.json names the model's (master) dtype; the files hold the export dtype
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(precision.export).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def optimizer_for(params, spec, total_steps: int):
    """AdamW and its schedule from a stage's ``OptimizerSpec`` (its moments take the parameters' dtype:
    float32 with master weights)."""
    from .optim import build_optimizer

    return build_optimizer(
        params,
        lr=spec.learning_rate,
        weight_decay=spec.weight_decay,
        betas=(spec.beta1, spec.beta2),
        schedule=spec.schedule,
        warmup_steps=spec.warmup_steps,
        total_steps=total_steps,
    )
