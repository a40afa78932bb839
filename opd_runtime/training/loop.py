"""The parts of a training stage that SFT and the OPD learner share: the prologue (the stage's spec, the
model to train, the optimizer and a resumed checkpoint), the optimizer step, the end-of-step bookkeeping
(metrics line, checkpoint cadence) and the stage's final output and summary."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..metrics import MetricsSink, NullSink
from ..spec import SpecError
from ..workspace import Workspace
from . import activations, checkpoint, distributed, sharding
from .model_setup import build_trainable, export_final, optimizer_for


def enabled_spec(cfg, stage: str):
    """The stage's spec section (``spec.sft``, ``spec.distill``); a SpecError when the run leaves it off."""
    if cfg is None or not cfg.enabled:
        raise SpecError(f"spec.{stage}: the {stage} stage is not enabled in this run")
    return cfg


def _quiet(*_args) -> None:
    pass


def rank_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on rank 0, silence on the others: rank 0 reports for all processes."""
    return log if distributed.is_main() else _quiet


def train_model(cfg, init: str, existing: Path | None, student, *, revision: str | None, strategy: str, log):
    """The model a stage trains, seeded by ``cfg.seed``, in training mode and the same on every rank.

    ``cfg`` is the stage's spec (``lora``, ``seed``, ``gradientCheckpointing``), ``student`` the run's
    student spec (``dtype``, ``trustRemoteCode``); ``existing`` is the checkpoint to resume from."""
    torch.manual_seed(cfg.seed)
    model = build_trainable(
        init,
        cfg.lora,
        student.dtype,
        existing,
        revision=revision,
        trust_remote_code=student.trust_remote_code,
        strategy=strategy,
    )
    activations.use_gradient_checkpointing(model, cfg.gradient_checkpointing)
    activations.use_fast_attention(model, log)
    distributed.broadcast_parameters(model)
    model.train()
    return model


@dataclass
class Optimization:
    """The optimizer, its schedule and the step to start from (0, or the resumed checkpoint's)."""

    optimizer: Any
    scheduler: Any
    start_step: int


def start_optimization(
    stage: str, cfg, model, existing: Path | None, sink: MetricsSink | NullSink, log
) -> Optimization:
    """The optimizer over ``cfg.steps``; with ``existing``, its state, the schedule's and the model's are
    restored from that checkpoint. The sink starts a fresh metrics file or keeps the resumed steps' lines."""
    optimizer, scheduler = optimizer_for(model.parameters(), cfg.optimizer, cfg.steps)
    start_step = checkpoint.restore(existing, optimizer, scheduler, model) if existing is not None else 0
    sink.begin(start_step)
    if start_step:
        log(f"{stage}: resumed from {existing} (step {start_step})")
    return Optimization(optimizer, scheduler, start_step)


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float | None) -> tuple[float, float]:
    """Clip, step and advance the schedule; returns (gradient norm before clipping, learning rate used).

    ``max_grad_norm`` None clips nothing (an infinite bound), but the norm is still measured for the metrics.

    With FSDP the gradients are DTensor shards: ``clip_grad_norm_`` computes the global norm over all
    ranks' shards (its result is a replicated DTensor, ``full_tensor()`` reads it).
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], math.inf if max_grad_norm is None else max_grad_norm
    )
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr


def end_step(
    record: dict,
    *,
    sink: MetricsSink | NullSink,
    on_step: Callable[[dict], None] | None,
    ckpt_root,
    checkpointing,
    total_steps: int,
    data_position: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
) -> None:
    """Log the step's record, then checkpoint on the stage's cadence and after the last step.

    Multi-process runs: rank 0 logs and writes the checkpoint (every rank holds the same weights and
    optimizer state), and the others wait for it, so a checkpoint named ``latest`` is always complete.
    With FSDP every rank writes its own shards (``checkpoint.save`` coordinates them).
    """
    main = distributed.is_main()
    if main:
        sink.log(record)
        if on_step is not None:
            on_step(record)
    done = record["step"]
    if done % checkpointing.every == 0 or done == total_steps:
        if main or sharding.is_sharded(model):
            checkpoint.save(
                ckpt_root,
                done,
                model=model,
                tokenizer=tokenizer,
                optimizer=optimizer,
                scheduler=scheduler,
                extra={"data_position": data_position},
                keep=checkpointing.keep,
            )
        distributed.barrier()


def finish_stage(
    stage: str, ws: Workspace, model, tokenizer, *, lora_enabled: bool, steps: int, summary_metric: str
) -> dict:
    """Export ``checkpoints/<stage>/final`` and write ``results/<stage>.json`` last (its presence = done).

    Rank 0 writes them (an FSDP model's weights are first gathered from all ranks); every rank returns
    its summary.
    """
    if sharding.is_sharded(model):
        final = export_final(model, tokenizer, ws.final_model(stage), lora_enabled=lora_enabled)
    if not distributed.is_main():
        return distributed.broadcast_object({})  # a placeholder: every rank receives rank 0's summary
    if not sharding.is_sharded(model):
        final = export_final(model, tokenizer, ws.final_model(stage), lora_enabled=lora_enabled)
    lines = [json.loads(ln) for ln in ws.metrics(stage).read_text().splitlines() if ln.strip()]
    result = {
        "stage": stage,
        "steps": steps,
        "final_model": str(final),
        f"{summary_metric}_first": lines[0][summary_metric] if lines else None,
        f"{summary_metric}_last": lines[-1][summary_metric] if lines else None,
    }
    ws.result(stage).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic_text(ws.result(stage), json.dumps(result, indent=2))
    return distributed.broadcast_object(result)
