"""What a stage's checkpoints were written for: the spec fields that give a training step its meaning.

``checkpoints/<stage>/spec-fingerprint.json`` records them when a training stage starts; resuming that
stage's checkpoints (the stage itself with ``--resume``, or ``opd run --resume`` skipping a finished stage)
under other values of them is refused with a SpecError (exit 2) naming each field, so a run re-created with
another spec over a retained workspace does not silently continue the old training. No torch: ``opd run``
checks before it starts anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .spec import DistillationRun, SpecError

FINGERPRINT_FILE = "spec-fingerprint.json"

# Per stage, the spec fields (wire paths below `spec`) that give a step its meaning: the weights' model and
# tokenizer, the adapter's shape, where the stage starts, the teacher it imitates, and what one step consumes
# (its data, batch and loss) and in which order (seed). Other fields may change between attempts and the
# resumed stage continues the same training with them: `steps` (train longer), the optimizer (e.g. a lower
# learning rate), checkpointing, micro-batching, gradient checkpointing, strategy, resources, metrics.
_MODEL = ("student.model", "student.revision", "student.tokenizer")
_LORA = ("lora.enabled", "lora.rank", "lora.alpha", "lora.targetModules")
SHAPING_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": (*_MODEL, *(f"sft.{f}" for f in ("dataset", "batchSize", "maxSeqLength", "seed", *_LORA))),
    "distill": (
        *_MODEL,
        "teacher.model",
        *(
            f"distill.{f}"
            for f in (
                "initFrom",
                "prompts",
                "promptsPerStep",
                "samplesPerPrompt",
                "loss",
                "objective",
                "seed",
                *_LORA,
            )
        ),
    ),
}


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def shaping_values(run: DistillationRun, stage: str) -> dict[str, Any]:
    """``{"spec.<path>": value}`` for ``stage``'s SHAPING_FIELDS in ``run`` (nested objects flattened)."""
    wire = run.spec.to_wire()
    out: dict[str, Any] = {}
    for path in SHAPING_FIELDS[stage]:
        node: Any = wire
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                break  # a field this version of the spec does not have
            node = node[part]
        else:
            out.update(_flat(node, f"spec.{path}"))
    return out


def check(root: Path, stage: str, values: dict[str, Any]) -> None:
    """Refuse (SpecError, exit 2) to resume ``root``'s checkpoints when they were written for other values
    of the shaping fields. Fields the record lacks (it predates them) or that no longer exist are not
    compared. ``record`` writes the record."""
    path = root / FINGERPRINT_FILE
    if not path.exists():
        return  # written before fingerprints existed: nothing to compare with
    recorded = json.loads(path.read_text())
    differ = [k for k in sorted(values.keys() & recorded.keys()) if values[k] != recorded[k]]
    if differ:
        changes = "; ".join(f"{k}: {recorded[k]!r} then, {values[k]!r} now" for k in differ)
        raise SpecError(
            f"spec.{stage}: the checkpoints in {root} were written for another spec ({changes}), and resuming "
            f"would continue them as if nothing had changed. Set these fields back to continue that training, "
            f"or start this spec afresh: a new workspace (another run name, or workspace.existingClaim), or "
            f"delete {root}"
        )


def record(root: Path, values: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{FINGERPRINT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / FINGERPRINT_FILE)
