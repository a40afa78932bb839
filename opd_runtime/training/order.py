"""Deterministic prompt order: a fresh seeded permutation per epoch, indexed by the global position.

The position (``step * prompts_per_step``) is all a resumed run needs to continue with the same prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def batch_at(items: Sequence[T], position: int, size: int, seed: int) -> list[T]:
    out, n = [], len(items)
    cache: dict[int, list[int]] = {}
    for pos in range(position, position + size):
        epoch, offset = divmod(pos, n)
        if epoch not in cache:
            order = list(range(n))
            random.Random(f"{seed}/{epoch}").shuffle(order)
            cache[epoch] = order
        out.append(items[cache[epoch][offset]])
    return out
