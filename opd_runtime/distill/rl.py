"""The RL baseline's pure parts (``spec.distill.objective: rl``): the verifiable reward and GRPO-style
group-normalised advantages.

The reward of a completion is 1.0 when its last ``\\boxed{}`` answer is the prompt's reference answer,
graded exactly as ``opd eval`` grades (``grading.grade_many`` with the dataset's ``kind``: ``aime``
compares integers, ``math`` integers or normalised strings, then math-verify), else 0.0. A completion
without a box earns 0.

Advantages are computed over the ``samplesPerPrompt`` completions of each prompt (a group):
``(r - mean_group) / (std_group + STD_EPS)`` with ``scale_by_std``, ``r - mean_group`` without (the
"Dr. GRPO" variant). ``std_group`` is the sample standard deviation (n - 1 in the denominator, as
``torch.std`` and TRL's GRPOTrainer compute it). A group whose rewards are all equal gets advantage 0 for
every sample: it carries no signal about which completion is better. The learner broadcasts a sample's
advantage to each of its completion tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..grading import grade_many

STD_EPS = 1e-4  # added to the group's standard deviation, as in TRL's GRPOTrainer


def dataset_kind(prompts) -> str:
    """How a prompt dataset's answers are graded: its ``kind`` when the dataset spec has one, else ``math``
    (integers still compare as integers; other answers go to math-verify)."""
    return getattr(prompts, "kind", None) or "math"


def rewards(completions: Sequence[str], answers: Sequence[str | None], kind: str) -> list[float]:
    """1.0 for each completion whose boxed answer is its reference answer (graded as eval does), else 0.0.

    A completion without a reference answer (``None``) cannot be graded: that is an error, not a zero.
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} reference answers")
    missing = sum(a is None for a in answers)
    if missing:
        raise ValueError(f"{missing} of {len(answers)} prompts have no reference answer to grade against")
    graded = grade_many([(c, a) for c, a in zip(completions, answers)], kind)
    return [1.0 if g.correct else 0.0 for g in graded]


def group_advantages(rewards_PG: Sequence[float], group_size: int, *, scale_by_std: bool = True) -> list[float]:
    """Per-sample advantages of ``rewards_PG`` (prompts x group_size, flattened prompt-major).

    Returns the same flat layout. Zero-variance groups (all rewards equal) get 0 for each sample.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(rewards_PG) % group_size:
        raise ValueError(f"{len(rewards_PG)} rewards do not split into groups of {group_size}")
    out: list[float] = []
    for start in range(0, len(rewards_PG), group_size):
        group = [float(r) for r in rewards_PG[start : start + group_size]]
        mean = sum(group) / group_size
        if all(r == group[0] for r in group):
            out.extend([0.0] * group_size)
            continue
        centred = [r - mean for r in group]
        if scale_by_std:
            std = math.sqrt(sum(c * c for c in centred) / (group_size - 1))
            centred = [c / (std + STD_EPS) for c in centred]
        out.extend(centred)
    return out


def zero_variance_fraction(rewards_PG: Sequence[float], group_size: int) -> float:
    """Share of the groups whose rewards are all equal (no learning signal from them)."""
    groups = [rewards_PG[i : i + group_size] for i in range(0, len(rewards_PG), group_size)]
    if not groups:
        return 0.0
    return sum(all(r == g[0] for r in g) for g in groups) / len(groups)
