"""Next-token training on (prompt, completion) pairs with loss on completion tokens only."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from .batches import right_pad
from .optim import build_optimizer


def completion_nll(model, batch) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the completion tokens, and their count."""
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, batch.input_ids_BT[:, 1:, None]).squeeze(-1)
    mask = batch.loss_mask_BT[:, 1:]
    return (nll * mask).sum(), int(mask.sum())


def fit(
    model,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """A compact in-memory SFT loop, used to build the tiny world's teacher and weak students."""
    rng = random.Random(seed)
    order: list[int] = []
    optimizer, scheduler = build_optimizer(
        model.parameters(),
        lr=lr,
        weight_decay=weight_decay,
        betas=(0.9, 0.95),
        schedule=schedule,
        warmup_steps=warmup_steps,
        total_steps=steps,
    )
    model.train()
    losses = []
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[:batch_size], order[batch_size:]
        batch = right_pad([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id)
        nll, n = completion_nll(model, batch)
        loss = nll / max(n, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
