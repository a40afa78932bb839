"""The teacher served by real vLLM (``opd serve-teacher``) in the tests: a run on the trained tiny world
with a served teacher (``served_run_doc``), and waiting for the server's log line."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

TOP_K = 20
SERVER_START_S = 600


def served_run_doc(**distill) -> dict:
    """A run on the tiny world with a served teacher; ``distill`` overrides spec.distill keys."""
    spec_distill = {
        "prompts": {"name": "tinymath", "split": "train", "difficulty": 2},
        "loss": "full_forward_kl",
        "steps": 2,
        "promptsPerStep": 32,
        "samplesPerPrompt": 4,
        "microBatchSize": 64,
        "maxNewTokens": 64,
        "temperature": 1.0,
        "seed": 0,
        "optimizer": {"learningRate": 3.0e-4},
        "sampler": {"backend": "vllm", "gpuMemoryUtilization": 0.1},
        "checkpointing": {"every": 100, "keep": 1},
        "metricsPort": 0,
        "resources": {"gpus": 0},
    }
    spec_distill.update(distill)
    return {
        "apiVersion": "opd.dev/v1alpha1",
        "kind": "DistillationRun",
        "metadata": {"name": "vllm-test"},
        "spec": {
            "student": {"model": "tiny://student", "dtype": "float32"},
            "teacher": {
                "model": "tiny://teacher",
                "dtype": "float32",
                "backend": "vllm-server",
                "serving": {"topLogprobs": TOP_K, "gpuMemoryUtilization": 0.1},
            },
            "distill": spec_distill,
        },
    }


def wait_for_line(log: Path, proc: subprocess.Popen, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        for line in content.splitlines():
            if text in line:
                return line
        if proc.poll() is not None:
            pytest.fail(
                f"the server exited with code {proc.returncode} before `{text}`:\n{content[-5000:]}", pytrace=False
            )
        time.sleep(0.5)
    pytest.fail(f"no `{text}` within {timeout:.0f} s:\n{log.read_text(errors='replace')[-5000:]}", pytrace=False)
