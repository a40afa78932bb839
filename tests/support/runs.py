"""DistillationRun documents for the tests: a run on two local models (``run_doc``, ``write_run``) and an
SFT-only run (``sft_run``), each shrunk from the examples so a stage takes seconds."""

from __future__ import annotations

from pathlib import Path

import yaml


def run_doc(student: Path | str, teacher: Path | str, *, student_tokenizer: str | None = None, **distill) -> dict:
    """A DistillationRun like examples/tiny-math.yaml, shrunk; ``distill`` overrides spec.distill keys."""
    spec_distill = {
        "prompts": {"name": "tinymath", "split": "train", "difficulty": 2, "maxSamples": 64},
        "steps": 2,
        "promptsPerStep": 2,
        "samplesPerPrompt": 2,
        "microBatchSize": 2,
        "maxNewTokens": 16,
        "temperature": 1.0,
        "seed": 0,
        "optimizer": {"learningRate": 1.0e-2, "warmupSteps": 0, "schedule": "constant"},
        "checkpointing": {"every": 1, "keep": 2},
        "metricsPort": 0,
        "resources": {"gpus": 0},
    }
    spec_distill.update(distill)
    student_spec = {"model": str(student), "dtype": "float32"}
    if student_tokenizer is not None:
        student_spec["tokenizer"] = str(student_tokenizer)
    return {
        "apiVersion": "opd.dev/v1alpha1",
        "kind": "DistillationRun",
        "metadata": {"name": "test-run"},
        "spec": {
            "student": student_spec,
            "teacher": {"model": str(teacher), "dtype": "float32", "backend": "local"},
            "distill": spec_distill,
        },
    }


def write_run(path: Path, student, teacher, **kw) -> Path:
    path.write_text(yaml.safe_dump(run_doc(student, teacher, **kw), sort_keys=False))
    return path


def sft_run(student: Path, dataset: dict, **sft) -> dict:
    spec_sft = {
        "dataset": dataset,
        "steps": 4,
        "batchSize": 4,
        "microBatchSize": 2,
        "maxSeqLength": 128,
        "packing": True,
        "seed": 0,
        "optimizer": {"learningRate": 1e-2, "warmupSteps": 0, "schedule": "constant"},
        "checkpointing": {"every": 2, "keep": 2},
    }
    spec_sft.update(sft)
    return {
        "apiVersion": "opd.dev/v1alpha1",
        "kind": "DistillationRun",
        "metadata": {"name": "sft-test"},
        "spec": {
            "student": {"model": str(student), "dtype": "float32"},
            "teacher": {"model": str(student), "backend": "local"},
            "sft": spec_sft,
        },
    }
