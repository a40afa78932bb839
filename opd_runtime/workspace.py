"""The workspace layout shared by every stage: a local directory, or the run's PVC mounted in a pod.

    checkpoints/<stage>/step-NNNNNN/   resumable checkpoints (see training/checkpoint.py)
    checkpoints/<stage>/final/         the stage's output model, loadable with from_pretrained
    metrics/<stage>.jsonl              one JSON object per step
    results/<stage>.json               the stage's final summary, written last (its presence = done)
    eval/<target>/<dataset>.json       per-problem evaluation results

Imports without torch: the operator uses it to know where stages write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("sft", "distill", "eval")


@dataclass(frozen=True)
class Workspace:
    root: Path

    def checkpoints(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def final_model(self, stage: str) -> Path:
        return self.checkpoints(stage) / "final"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.jsonl"

    def result(self, stage: str) -> Path:
        return self.root / "results" / f"{stage}.json"

    def eval_dir(self, target: str) -> Path:
        return self.root / "eval" / target

    def resolve(self, path_or_id: str) -> str:
        """A relative local path is taken relative to the workspace; hub ids pass through."""
        p = Path(path_or_id)
        if p.is_absolute():
            return str(p)
        candidate = self.root / p
        if candidate.exists() or path_or_id.startswith(("./", "../")):
            return str(candidate)
        return path_or_id
