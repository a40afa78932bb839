"""The SFT loop (``opd sft``): next-token loss on the final assistant turn of teacher traces.

One optimizer step per ``batchSize`` traces, accumulated over micro-batches of at most
``microBatchSize`` traces and ``maxTokensPerMicroBatch`` tokens (each packed into one row when
``packing`` is on). The loss is the mean NLL over all
assistant tokens of the step, so accumulation and packing do not change it. Checkpoints and resume work
as in the OPD learner; the output (``checkpoints/sft/final``) is what the distill stage starts from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import modeling
from ..metrics import MetricsSink, NullSink
from ..spec import DistillationRun, SpecError
from ..training import checkpoint, chunked, distributed, sharding
from ..training.batches import length_groups, right_pad
from ..training.loop import (
    enabled_spec,
    end_step,
    finish_stage,
    optimizer_step,
    rank_log,
    start_optimization,
    train_model,
)
from ..training.order import batch_at
from ..workspace import Workspace
from ..world_step import ensure_world
from .packing import pack
from .trace_store import TraceStore, store_path, write_store
from .traces import load_traces, tokenize


def micro_batch_nll(model, examples, *, packing: bool, pad_id: int) -> torch.Tensor:
    """Summed NLL of the completion tokens of ``examples`` (one forward pass).

    Packed: the examples concatenated into one row with restarted position ids (no attention mask, no
    padding). Padded: one right-padded row each (no attention mask either: causal attention never lets a
    real token see the padding after it). The loss is taken from the final hidden states a chunk of
    tokens at a time (``training.chunked``), never as a (tokens x vocabulary) tensor.
    """
    dev = next(model.parameters()).device
    if packing:
        rows = pack(examples, None, pad_id)
        ids_BT, mask_BT = rows.input_ids_BT.to(dev), rows.loss_mask_BT.to(dev)
        # the position ids stay in host memory: the attention's split into traces is read from them there
        hidden_BTD = chunked.final_hidden_states(model, ids_BT, position_ids_BT=rows.position_ids_BT)
    else:
        batch = right_pad([p for p, _ in examples], [c for _, c in examples], pad_id)
        ids_BT, mask_BT = batch.input_ids_BT.to(dev), batch.loss_mask_BT.to(dev)
        hidden_BTD = chunked.final_hidden_states(model, ids_BT)
    sel_BT = chunked.select_predicting(mask_BT)
    return chunked.cross_entropy_sum(hidden_BTD[:, :-1][sel_BT], chunked.output_head(model), ids_BT[:, 1:][sel_BT])


def micro_batches(examples, cfg) -> list[list[int]]:
    """Indices of the step's examples per micro-batch (``microBatchSize`` and ``maxTokensPerMicroBatch``)."""
    return length_groups(
        [len(p) + len(c) for p, c in examples],
        max_count=cfg.micro_batch_size,
        max_tokens=cfg.max_tokens_per_micro_batch,
        packed=cfg.packing,
    )


def run_sft(
    run: DistillationRun,
    workspace: Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    cfg = enabled_spec(run.spec.sft, "sft")
    log = rank_log(log)
    ws = Workspace(Path(workspace))
    ensure_world(run, ws, "sft")
    ckpt_root = ws.checkpoints("sft")
    existing = checkpoint.resumable(ckpt_root, resume, run, "sft")
    student = run.spec.student
    init = ws.resolve(student.model)
    tokenizer = modeling.load_tokenizer(
        ws.resolve(student.tokenizer) if student.tokenizer else init,
        revision=None if student.tokenizer else student.revision,
        trust_remote_code=student.trust_remote_code,
    )
    store = store_path(cfg.dataset, ws.root)
    if distributed.is_main() and not store.exists():
        try:
            n = write_store(load_traces(cfg.dataset, ws.root), store)
        except FileNotFoundError as err:
            raise SpecError(
                f"spec.sft.dataset: {err}; fix `path` (relative paths are taken from the workspace)"
            ) from None
        log(f"sft: {n} traces written to {store}")
    distributed.barrier()
    traces = TraceStore(store)
    if not traces:
        raise SpecError("spec.sft.dataset: no trace ends with an assistant turn; check the dataset and format")
    log(
        f"sft: student {init}, {len(traces)} traces, {cfg.steps} steps x {cfg.batch_size} traces "
        f"({'packed' if cfg.packing else 'padded'} micro-batches of <= {cfg.micro_batch_size} traces"
        + (f", <= {cfg.max_tokens_per_micro_batch} tokens" if cfg.max_tokens_per_micro_batch else "")
        + ")"
        + (f", split over {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
    )

    model = train_model(cfg, init, existing, student, revision=student.revision, strategy=cfg.strategy, log=log)
    sink = MetricsSink(ws.metrics("sft")) if distributed.is_main() else NullSink()
    opt = start_optimization("sft", cfg, model, existing, sink, log)
    optimizer, scheduler, start_step = opt.optimizer, opt.scheduler, opt.start_step

    pad_id = tokenizer.pad_token_id
    order = list(range(len(traces)))
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        distributed.seed_step(cfg.seed, step)
        # this process's share of the step's batch; the loss is normalised by the whole batch's tokens
        examples = [
            tokenize(tokenizer, traces[i], cfg.max_seq_length)
            for i in distributed.share(batch_at(order, step * cfg.batch_size, cfg.batch_size, cfg.seed))
        ]
        n_tokens = max(1, int(distributed.all_sum(sum(len(c) for _, c in examples))[0]))
        total = 0.0
        for group in sharding.lockstep(micro_batches(examples, cfg), model):
            nll = micro_batch_nll(model, [examples[i] for i in group], packing=cfg.packing, pad_id=pad_id) / n_tokens
            nll.backward()
            total += nll.item()
        distributed.all_reduce_gradients(model)
        grad_norm, lr = optimizer_step(model, optimizer, scheduler, cfg.optimizer.max_grad_norm)
        total, tokens = distributed.all_sum(total, sum(len(p) + len(c) for p, c in examples))
        seconds = time.perf_counter() - t0
        record = {
            "step": step + 1,
            "loss": total,
            "completion_tokens": n_tokens,
            "tokens": int(tokens),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "step_seconds": seconds,
            "tokens_per_second": n_tokens / seconds,
        }
        end_step(
            record,
            sink=sink,
            on_step=on_step,
            ckpt_root=ckpt_root,
            checkpointing=cfg.checkpointing,
            total_steps=cfg.steps,
            data_position=(step + 1) * cfg.batch_size,
            model=model,
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
        )
    return finish_stage(
        "sft", ws, model, tokenizer, lora_enabled=cfg.lora.enabled, steps=cfg.steps, summary_metric="loss"
    )
