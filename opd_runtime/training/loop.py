"""The parts of a training stage's loop that SFT and the OPD learner share: the optimizer step, the
end-of-step bookkeeping (metrics line, checkpoint cadence) and the stage's final output and summary."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch

from ..metrics import MetricsSink, NullSink
from ..workspace import Workspace
from . import checkpoint, distributed, sharding
from .model_setup import export_final


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
