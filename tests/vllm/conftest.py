"""The trained tiny world (``tiny://teacher``, ``tiny://student``: opd_runtime.tiny_models) for the real-engine
tests; the untrained models of the mechanics tests are the root conftest's ``random_models``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd_runtime import modeling, tinymath
from opd_runtime.training.batches import prompt_ids
from opd_runtime.workspace import MODELS_DIR, Workspace, ensure_tiny_world


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> SimpleNamespace:
    """A workspace holding the trained tiny world (copied from the cache; built there once, ~6 min)."""
    torch.set_num_threads(2)  # the random_models fixture drops to 1 thread for the mechanics tests
    root = tmp_path_factory.mktemp("vllm-world")
    ws = Workspace(root)
    ensure_tiny_world(root / MODELS_DIR)
    teacher_dir, student_dir = Path(ws.resolve("tiny://teacher")), Path(ws.resolve("tiny://student"))
    tok = modeling.load_tokenizer(str(student_dir))
    problems = tinymath.generate(64, split="test", seed=0, difficulty=2)
    prompts = [prompt_ids(tok, tinymath.chat_messages(p.problem)) for p in problems]
    return SimpleNamespace(root=root, teacher=teacher_dir, student=student_dir, tokenizer=tok, prompts=prompts)
