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

TINY_SCHEME = "tiny://"
MODELS_DIR = "models"  # under the workspace: where tiny:// models are (ensure_tiny_world puts them there)


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
        """A relative local path is taken relative to the workspace; hub ids pass through.

        ``tiny://NAME`` names a model of the tiny world (``teacher``, ``student-init``, ``student``,
        ``tokenizer``) in ``models/`` of the workspace. It lets one run file work unchanged locally, in CI
        and on a kind cluster, where no stage can download a model. Resolving only names the folder: a
        stage that loads the models builds the world first (``world_step.ensure_world``).
        """
        if path_or_id.startswith(TINY_SCHEME):
            return str(self.root / MODELS_DIR / path_or_id[len(TINY_SCHEME) :])
        p = Path(path_or_id)
        if p.is_absolute():
            return str(p)
        candidate = self.root / p
        if candidate.exists() or path_or_id.startswith(("./", "../")):
            return str(candidate)
        return path_or_id


def ensure_tiny_world(models_dir: Path) -> Path:
    """Build (or copy from the cache) the tiny world into ``models_dir`` once, even with concurrent stages."""
    import fcntl

    if (models_dir / "world.json").exists():
        return models_dir
    models_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(models_dir.parent / ".models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second stage waits for the first one's build
        if not (models_dir / "world.json").exists():
            from .tiny_models import WorldConfig, build_cached, default_cache_dir

            build_cached(models_dir, WorldConfig(), default_cache_dir())
    return models_dir
