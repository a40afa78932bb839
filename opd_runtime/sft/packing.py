"""Packing several traces into one row without letting them see each other, and without a mask.

Each row carries position ids that restart at every trace. No attention mask is passed with them:
transformers then finds the traces from the restarts (``masking_utils.find_packed_sequence_indices``)
and keeps them apart: flash-attention (GPU) runs varlen over cu_seqlens with no mask at all; sdpa and
eager (CPU) build a boolean block-diagonal causal mask internally (T x T booleans per row
rather than a B x 1 x T x T float mask). A packed row therefore computes exactly what the
traces would compute one by one. Rows shorter than the longest are right-padded; padding sits after
every real token, so under the causal mask no real token sees it, and it carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..training.batches import length_groups


@dataclass
class PackedRows:
    input_ids_BT: torch.Tensor
    position_ids_BT: torch.Tensor  # restarts at 0 at every trace (and at the padding)
    loss_mask_BT: torch.Tensor  # 1 on completion tokens


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of total length <= capacity (first-fit decreasing)."""
    return length_groups(lengths, max_count=len(lengths) or 1, max_tokens=capacity, packed=True)


def pack(examples: Sequence[tuple[list[int], list[int]]], capacity: int | None, pad_id: int) -> PackedRows:
    """``examples`` (prompt, completion) packed into rows of at most ``capacity`` tokens (one row: None)."""
    lengths = [len(p) + len(c) for p, c in examples]
    rows = [list(range(len(examples)))] if capacity is None else first_fit(lengths, capacity)
    T = max(sum(lengths[i] for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    loss = torch.zeros((B, T))
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            p, c = examples[i]
            n = len(p) + len(c)
            ids[b, at : at + n] = torch.tensor(list(p) + list(c))
            pos[b, at : at + n] = torch.arange(n)
            loss[b, at + len(p) : at + n] = 1.0
            at += n
        pos[b, at:] = torch.arange(T - at)  # the padding as one more "trace"
    return PackedRows(ids, pos, loss)
