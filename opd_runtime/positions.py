"""What each stage asks of its models' positions, checked before anything runs.

A vLLM engine refuses a request whose prompt plus new tokens exceed its model's ``max_position_embeddings``;
an eval asking for more new tokens than the model holds would otherwise fail only when eval starts, after
hours of SFT and OPD. Pure and torch-free (the plan layer): ``opd validate`` reads the models' configs where
the machine has them (``preflight.model_positions``), the operator only this module's table of known models.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import DistillationRun, ModelSpec

# max_position_embeddings of hub models, from their published config.json files: Qwen3's post-trained dense
# models hold 40,960 positions, its Base models 32,768. First match wins; a model no row names is checked
# only where its config is reachable.
KNOWN_POSITIONS: tuple[tuple[str, int], ...] = (
    (r"Qwen/Qwen3-[0-9.]+B-Base", 32768),
    (r"Qwen/Qwen3-(0\.6|1\.7|4|8|14|32)B(-FP8)?", 40960),
)

# (positions or None, where they were read) for a model of the run.
PositionsOf = Callable[["ModelSpec"], tuple[int | None, str]]


def known_positions(model: str) -> tuple[int | None, str]:
    """``max_position_embeddings`` of ``model`` from ``KNOWN_POSITIONS``; (None, why) when no row names it."""
    for pattern, positions in KNOWN_POSITIONS:
        if re.fullmatch(pattern, model):
            return positions, "the known-model table (its config is not on this machine)"
    return None, "no config on this machine and not in the known-model table"


def context_problems(run: DistillationRun, positions_of: PositionsOf | None = None) -> list[str]:
    """Each setting whose tokens a vLLM engine must fit into its model's positions and cannot, as messages
    naming the field: OPD samples with the vllm sampler and eval answers with a vLLM backend (``maxNewTokens``
    plus at least one prompt token; eval checks the exact prompt lengths again when it has the prompts). The
    hf paths are not refused: they can run past the positions. ``positions_of`` defaults to the table."""
    lookup: PositionsOf = positions_of or (lambda m: known_positions(m.model))
    spec = run.spec
    problems: list[str] = []

    def check(field: str, new_tokens: int, label: str, m: ModelSpec) -> None:
        positions, source = lookup(m)
        if positions is not None and new_tokens + 1 > positions:
            problems.append(
                f"{field}: {new_tokens} new tokens after a prompt of at least one token need more than the "
                f"{positions} positions {label} ({m.model}) holds (max_position_embeddings, from {source}); "
                f"set {field} to at most {positions} minus the longest prompt"
            )

    distill = spec.distill
    if distill is not None and distill.enabled and distill.sampler is not None and distill.sampler.backend == "vllm":
        check("spec.distill.maxNewTokens", distill.max_new_tokens, "the student", spec.student)
    if spec.eval is not None and spec.eval.enabled and spec.eval.backend != "hf":
        for target in spec.eval.targets:
            m = spec.teacher if target == "teacher" else spec.student  # sft and distill outputs keep its config
            check("spec.eval.maxNewTokens", spec.eval.max_new_tokens, f"eval target `{target}`", m)
    return problems
