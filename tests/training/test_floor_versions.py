"""pyproject's floors are true: the oldest versions it names install together and run opd's training code.

``floor_env.floor_venv()`` installs exactly the ``runtime`` extra's floors (torch 2.11, transformers 5.17:
what the lent GPU machine has) in a venv of its own, cached by version set, without pydantic and without
opd installed, as on that machine. The training unit tests then run there from the checkout, with pydantic
from the wheels bench/gpu_check.sh carries (at pyproject's pydantic floor). The GPU check's tiny mode in
that venv is tests/training/test_gpu_check.py's stand-in test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support.floor_env import floor_venv, floors, installed_floors

ROOT = Path(__file__).resolve().parents[2]
# The training path's unit tests that need no tiny world, no vLLM and no control plane (about a minute).
TRAINING_TESTS = [
    "tests/training/test_chunked.py",
    "tests/training/test_loss.py",
    "tests/training/test_precision.py",
    "tests/training/test_sft.py",
]

MARKERS = "not slow and not vllm and not k8s"

pytestmark = pytest.mark.slow


def test_the_floor_venv_holds_exactly_pyprojects_floors():
    from packaging.version import Version

    installed = installed_floors(floor_venv())
    assert {name: Version(v) for name, v in installed.items()} == {name: Version(v) for name, v in floors().items()}


def test_the_training_tests_pass_at_the_floors(tmp_path):
    python = floor_venv() / "bin" / "python"
    subprocess.run(["bash", str(ROOT / "bench" / "gpu_wheels.sh")], check=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "opd_runtime").symlink_to(ROOT / "opd_runtime")
    subprocess.run(
        [str(python), str(ROOT / "bench" / "unpack_wheels.py"), str(ROOT / ".gpu-wheels"), str(tmp_path / "site")],
        check=True,
    )
    env = {
        **os.environ,
        "PYTHONSAFEPATH": "1",
        "PYTHONPATH": f"{tmp_path / 'src'}:{tmp_path / 'site'}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", MARKERS, *TRAINING_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
