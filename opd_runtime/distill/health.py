"""Held-out health of a distillation: the student's reverse KL to the teacher on fresh samples.

The per-step reverse KL in metrics.jsonl is measured on the training batch, a noisy estimate on
prompts the student is being trained on; this one samples the student on held-out prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..generation import sample
from .teacher import Teacher


@torch.no_grad()
def heldout_reverse_kl(
    student,
    tokenizer,
    teacher: Teacher,
    prompts: Sequence[Sequence[int]],
    *,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
) -> float:
    """Mean over sampled completion tokens of log p_student - log p_teacher (nats per token)."""
    samples = sample(
        student, tokenizer, prompts, n=samples_per_prompt, temperature=temperature, max_new_tokens=max_new_tokens
    )
    teacher_lp = teacher.score(samples)
    total = sum(sum(s.logprobs) - sum(t) for s, t in zip(samples, teacher_lp))
    return total / max(1, sum(len(s.completion_ids) for s in samples))
