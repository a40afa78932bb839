"""Packing several traces into one row without letting them see each other.

Each row carries position ids that restart at every trace and a block-diagonal causal attention mask,
so a packed row computes exactly what the traces would compute one by one, with no padding inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedRows:
    input_ids_BT: torch.Tensor
    position_ids_BT: torch.Tensor
    attention_mask_B1TT: torch.Tensor  # additive: 0 where allowed, -inf-like elsewhere
    loss_mask_BT: torch.Tensor


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of total length <= capacity (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(examples: Sequence[tuple[list[int], list[int]]], capacity: int, pad_id: int,
         dtype: torch.dtype = torch.float32) -> PackedRows:
    lengths = [len(p) + len(c) for p, c in examples]
    rows = first_fit(lengths, capacity)
    T = max(sum(lengths[i] for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    loss = torch.zeros((B, T))
    for b, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            p, c = examples[i]
            n = len(p) + len(c)
            ids[b, at: at + n] = torch.tensor(list(p) + list(c))
            pos[b, at: at + n] = torch.arange(n)
            seg[b, at: at + n] = k
            loss[b, at + len(p): at + n] = 1.0
            at += n
    causal = torch.arange(T)[:, None] >= torch.arange(T)[None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    allowed = same & causal
    # padding rows attend to themselves only, so no row of the softmax is empty
    allowed |= torch.eye(T, dtype=torch.bool)[None]
    mask = torch.zeros((B, 1, T, T), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return PackedRows(ids, pos, mask, loss)
