"""SFT and on-policy distillation on tinymath move a weak student towards its teacher.

Uses the trained tiny world (``opd tiny-models``; built once, then reused from the cache directory):
a teacher that solves nearly every held-out problem and a weak student SFT'd on a small trace budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cache_dir
from opd_runtime import modeling, tinymath
from opd_runtime.distill.health import heldout_reverse_kl
from opd_runtime.distill.learner import run_distill
from opd_runtime.distill.teacher import LocalTeacher
from opd_runtime.sft.trainer import run_sft
from opd_runtime.spec import parse_run
from opd_runtime.tiny_models import WorldConfig, accuracy, build_cached
from opd_runtime.training.batches import prompt_ids

pytestmark = pytest.mark.slow
HELDOUT = 200


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The trained tiny world (teacher ~100%, weak student ~24% held-out greedy accuracy)."""
    torch.set_num_threads(2)  # the shared fixture drops to 1 thread for the mechanics tests
    root = tmp_path_factory.mktemp("trained-world")
    build_cached(root / "models", WorldConfig(), cache_dir(), log=print)
    return root


def world_run(world: Path, name: str, stage_yaml: str):
    """A run on the trained world's student and teacher; ``stage_yaml`` is the stage section."""
    return parse_run(yaml.safe_load(f"""
apiVersion: opd.dev/v1alpha1
kind: DistillationRun
metadata: {{name: {name}}}
spec:
  student: {{model: {world}/models/student, dtype: float32}}
  teacher: {{model: {world}/models/teacher, dtype: float32, backend: local}}
{stage_yaml}"""))


def measure(model_dir: Path, teacher: LocalTeacher | None = None) -> dict:
    """Held-out greedy accuracy, and (given a teacher) held-out reverse KL on fresh samples."""
    tok = modeling.load_tokenizer(str(model_dir))
    model = modeling.load_causal_lm(str(model_dir), dtype="float32")
    problems = tinymath.generate(HELDOUT, split="test", seed=0, difficulty=2)
    out = {"accuracy": accuracy(model, tok, problems)}
    if teacher is not None:
        prompts = [prompt_ids(tok, tinymath.chat_messages(p.problem)) for p in problems[:64]]
        torch.manual_seed(1234)
        out["reverse_kl"] = heldout_reverse_kl(model, tok, teacher, prompts, samples_per_prompt=4)
    return out


def test_opd_lowers_reverse_kl_and_raises_heldout_accuracy(world, tmp_path):
    run = world_run(world, "opd-tinymath", """\
  distill:
    prompts: {name: tinymath, split: train, difficulty: 2}
    loss: full_forward_kl
    steps: 200
    promptsPerStep: 32
    samplesPerPrompt: 4
    microBatchSize: 64
    maxNewTokens: 64
    optimizer: {learningRate: 3.0e-4, warmupSteps: 20}
    checkpointing: {every: 100, keep: 1}
    metricsPort: 0
""")
    teacher = LocalTeacher(modeling.load_causal_lm(str(world / "models" / "teacher"), dtype="float32"))
    teacher_acc = json.loads((world / "models" / "world.json").read_text())["teacher"]["accuracy"]
    before = measure(world / "models" / "student", teacher)
    run_distill(run, tmp_path, log=print)
    after = measure(tmp_path / "checkpoints" / "distill" / "final", teacher)
    print(f"teacher accuracy {teacher_acc:.1%}; before {before}; after {after}")
    assert after["reverse_kl"] < 0.85 * before["reverse_kl"]
    assert after["accuracy"] >= before["accuracy"] + 0.08
    assert after["accuracy"] <= teacher_acc


def test_sft_on_fresh_tinymath_traces_raises_accuracy(world, tmp_path):
    run = world_run(world, "sft-tinymath", """\
  sft:
    dataset: {name: tinymath, split: train, difficulty: 2, maxSamples: 8000}
    steps: 60
    batchSize: 128
    microBatchSize: 128
    maxSeqLength: 512
    packing: true
    optimizer: {learningRate: 1.0e-3, warmupSteps: 5, schedule: constant}
    checkpointing: {every: 60, keep: 1}
""")
    before = measure(world / "models" / "student")["accuracy"]
    run_sft(run, tmp_path, log=print)
    after = measure(tmp_path / "checkpoints" / "sft" / "final")["accuracy"]
    print(f"SFT: held-out greedy accuracy {before:.1%} -> {after:.1%}")
    assert after >= before + 0.10
