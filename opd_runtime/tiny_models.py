"""The tiny world: a tokenizer, a teacher and students of the Qwen3 architecture, built offline.

``opd tiny-models --out DIR`` writes ``DIR/tokenizer``, ``DIR/teacher`` (trained on tinymath traces until
it solves most held-out problems), ``DIR/student-init`` (random weights) and ``DIR/student`` (a weak
student: the student architecture trained briefly on a small trace budget), plus ``DIR/world.json``
with the measured accuracy of each. All models share one tokenizer and chat template, so they pass
the OPD pre-flight check. Head dim is 64 because vLLM's CPU attention rejects smaller ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import tinymath


@dataclass
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int = 64

    def config(self, vocab_size: int, tokenizer):
        from transformers import Qwen3Config

        return Qwen3Config(
            vocab_size=vocab_size,
            max_position_embeddings=1024,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            torch_dtype="float32",
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **asdict(self),
        )


TEACHER_SHAPE = ModelShape(
    hidden_size=128, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, intermediate_size=384
)
STUDENT_SHAPE = ModelShape(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=384
)


@dataclass
class WorldConfig:
    """How the tiny world is built.

    The teacher is trained on plenty of tinymath traces until it solves nearly every held-out problem.
    The weak student gets a small trace budget (``student_traces``) and trains on it for several epochs,
    like an SFT stage that has run out of teacher traces: it reaches ~25% held-out accuracy.

    ``threads`` fixes torch's intra-op thread count for the build (and is part of the cache key): the
    float sums inside a matmul are split by thread, so another count trains another world. With the
    count, the seeds and deterministic algorithms fixed, and the build's float kernels pinned to ones
    every x86-64 CPU runs alike (``PORTABLE_MATH_ENV``), a build repeats bit for bit on any such machine:
    everyone gets the world whose weights ``RECORDED_WORLDS`` lists.
    """

    difficulty: int = 2
    seed: int = 0
    teacher_traces: int = 20_000
    teacher_steps: int = 1500
    teacher_lr: float = 3e-3
    student_traces: int = 1000
    student_steps: int = 400
    student_lr: float = 2e-3
    batch_size: int = 64
    eval_problems: int = 200
    threads: int = 2
    teacher: ModelShape = field(default_factory=lambda: TEACHER_SHAPE)
    student: ModelShape = field(default_factory=lambda: STUDENT_SHAPE)


def _corpus(cfg: WorldConfig, tokenizer_template) -> list[str]:
    import jinja2

    template = jinja2.Environment().from_string(tokenizer_template)
    texts = []
    for p in tinymath.generate(4000, seed=cfg.seed, difficulty=cfg.difficulty):
        texts.append(
            template.render(messages=tinymath.chat_messages(p.problem, p.solution), add_generation_prompt=False)
        )
    return texts


def trace_examples(tokenizer, problems) -> list[tuple[list[int], list[int]]]:
    from .training.batches import completion_ids, prompt_ids

    return [
        (prompt_ids(tokenizer, tinymath.chat_messages(p.problem)), completion_ids(tokenizer, p.solution))
        for p in problems
    ]


def solved(model, tokenizer, problems, *, temperature: float = 0.0, max_new_tokens: int = 96) -> list[bool]:
    """Whether the model's answer to each problem is right (greedy by default), in problem order."""
    from .generation import sample
    from .grading.answers import is_correct_integer
    from .training.batches import prompt_ids

    prompts = [prompt_ids(tokenizer, tinymath.chat_messages(p.problem)) for p in problems]
    samples = sample(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens)
    texts = tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=False)
    return [is_correct_integer(t, p.answer) for t, p in zip(texts, problems)]


def accuracy(model, tokenizer, problems, *, temperature: float = 0.0, max_new_tokens: int = 96) -> float:
    right = solved(model, tokenizer, problems, temperature=temperature, max_new_tokens=max_new_tokens)
    return sum(right) / len(problems)


def new_model(shape: ModelShape, tokenizer, seed: int):
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(shape.config(len(tokenizer), tokenizer))


@contextmanager
def reproducible(threads: int, seed: int):
    """Fixed intra-op threads, deterministic algorithms and seeded RNGs for the block; restored after."""
    import random

    import numpy as np
    import torch

    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


PROGRESS_SECONDS = 15.0  # a build's training phases report a progress line this often


class StepReporter:
    """Progress lines for one training phase of the build (``fit``'s ``on_step``): the first step, then one
    every ``every`` seconds and the last, each with the loss, the time so far and the time left."""

    def __init__(
        self,
        phase: str,
        total: int,
        log: Callable[[str], None],
        *,
        every: float = PROGRESS_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.phase, self.total, self.log, self.every, self.clock = phase, total, log, every, clock
        self.started = clock()
        self.last_line: float | None = None

    def __call__(self, step: int, loss: float) -> None:
        done, now = step + 1, self.clock()
        if self.last_line is not None and done < self.total and now - self.last_line < self.every:
            return
        self.last_line = now
        elapsed = now - self.started
        eta = f", about {elapsed / done * (self.total - done):.0f}s left" if done < self.total else ""
        self.log(f"{self.phase}: step {done}/{self.total}, loss {loss:.3f}, {elapsed:.0f}s{eta}")


# The float kernels a build runs, chosen so that every x86-64 CPU computes the same bits: torch's own
# vectorised kernels at their baseline (the AVX2/AVX-512 variants sum in other orders) and MKL's
# conditional numerical reproducibility mode (otherwise MKL picks a GEMM kernel per instruction set).
# Both are read once, when a process first uses them, so a build runs in a child process started with
# them. Measured on 6 training steps: without them, MKL_ENABLE_INSTRUCTIONS=AVX2/SSE4_2 (how MKL imitates
# older CPUs) and ATEN_CPU_CAPABILITY=avx2/default each trained other weights; with them, all were equal.
PORTABLE_MATH_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def portable_math() -> bool:
    """Whether this process computes with ``PORTABLE_MATH_ENV`` (set before torch first used them)."""
    import os

    import torch

    return (
        os.environ.get("MKL_CBWR") == PORTABLE_MATH_ENV["MKL_CBWR"]
        and torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    )


def build(out: Path, cfg: WorldConfig, log=print) -> dict:
    """Train the world into ``out`` (in a child process with ``PORTABLE_MATH_ENV`` unless this process
    already computes that way) and return its ``world.json``."""
    if not portable_math():
        return _build_in_child(out, cfg, log)
    with reproducible(cfg.threads, cfg.seed):
        return _build(out, cfg, log)


def _build_in_child(out: Path, cfg: WorldConfig, log) -> dict:
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "opd_runtime.tiny_models", "--out", str(out), "--config", json.dumps(asdict(cfg))]
    # the caller's other settings (threads, MKL_ENABLE_INSTRUCTIONS, ...) pass through: the build fixes
    # what matters itself, and a test imitates other CPUs through them
    env = {**os.environ, **PORTABLE_MATH_ENV, "PYTHONSAFEPATH": "1"}
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        assert child.stdout is not None
        lines = []
        for line in child.stdout:
            lines.append(line.rstrip("\n"))
            log(lines[-1])
    if child.returncode != 0:
        tail = "\n".join(lines[-20:])
        raise RuntimeError(f"tiny world: the build exited with {child.returncode}:\n{tail}")
    return json.loads((out / "world.json").read_text())


def weights_sha256(model) -> str:
    """One hash over every tensor's name, dtype, shape and bytes: equal hashes mean bit-identical weights."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _build(out: Path, cfg: WorldConfig, log) -> dict:
    from .tokenizer_build import build_tokenizer, chat_template
    from .training.supervised import fit

    out.mkdir(parents=True, exist_ok=True)
    log("tokenizer: training the BPE tokenizer on 4,000 tinymath traces")
    tokenizer = build_tokenizer(_corpus(cfg, chat_template()))
    tokenizer.save_pretrained(out / "tokenizer")
    traces = tinymath.generate(cfg.teacher_traces, split="train", seed=cfg.seed, difficulty=cfg.difficulty)
    test = tinymath.generate(cfg.eval_problems, split="test", seed=cfg.seed, difficulty=cfg.difficulty)
    report: dict = {"config": asdict(cfg), "vocab_size": len(tokenizer)}

    def save(model, name: str, acc: float, seconds: float):
        model.generation_config.eos_token_id = [tokenizer.eos_token_id]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        n_params = sum(p.numel() for p in model.parameters())
        report[name] = {
            "accuracy": acc,
            "parameters": n_params,
            "train_seconds": round(seconds, 1),
            "weights_sha256": weights_sha256(model),
        }
        log(f"{name}: {n_params / 1e6:.2f}M parameters, held-out greedy accuracy {acc:.1%} ({seconds:.0f}s)")

    t0 = time.time()
    teacher = new_model(cfg.teacher, tokenizer, cfg.seed)
    log(f"teacher: training on {cfg.teacher_traces:,} traces for {cfg.teacher_steps} steps")
    fit(
        teacher,
        trace_examples(tokenizer, traces),
        pad_id=tokenizer.pad_token_id,
        steps=cfg.teacher_steps,
        batch_size=cfg.batch_size,
        lr=cfg.teacher_lr,
        warmup_steps=50,
        seed=cfg.seed,
        on_step=StepReporter("teacher", cfg.teacher_steps, log),
    )
    log(f"teacher: greedy accuracy on {cfg.eval_problems} held-out problems")
    save(teacher, "teacher", accuracy(teacher, tokenizer, test), time.time() - t0)

    t0 = time.time()
    student = new_model(cfg.student, tokenizer, cfg.seed + 1)
    save(student, "student-init", accuracy(student, tokenizer, test), 0.0)
    log(f"student: training on {cfg.student_traces:,} traces for {cfg.student_steps} steps")
    fit(
        student,
        trace_examples(tokenizer, traces[: cfg.student_traces]),
        pad_id=tokenizer.pad_token_id,
        steps=cfg.student_steps,
        batch_size=cfg.batch_size,
        lr=cfg.student_lr,
        warmup_steps=20,
        seed=cfg.seed + 1,
        on_step=StepReporter("student", cfg.student_steps, log),
    )
    save(student, "student", accuracy(student, tokenizer, test), time.time() - t0)
    (out / "world.json").write_text(json.dumps(report, indent=2))
    return report


BUILD_MINUTES = 6  # a build of the default WorldConfig, on 2 cores (docs/getting-started/local.md)
# Bump when build() changes what it trains; the modules below are hashed as well.
BUILD_VERSION = 3
# The code that decides the world's weights (data, tokenizer, training loop), so a change to it
# invalidates cached builds while unrelated edits do not.
_WEIGHT_SOURCES = (
    "tinymath.py",
    "tokenizer_build.py",
    "templates/chatml_think.jinja",
    "training/supervised.py",
    "training/batches.py",
    "training/optim.py",
)


def _cache_key(cfg: WorldConfig) -> str:
    import hashlib

    import torch
    import transformers

    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    # no CPU in the key: the build's kernels are pinned (PORTABLE_MATH_ENV), so every CPU builds one world
    h.update(
        f"{BUILD_VERSION}/{torch.__version__}/{transformers.__version__}/{sorted(PORTABLE_MATH_ENV.items())}".encode()
    )
    here = Path(__file__).parent
    for src in _WEIGHT_SOURCES:
        h.update((here / src).read_bytes())
    return h.hexdigest()[:16]


def build_cached(out: Path, cfg: WorldConfig, cache_dir: Path | None, log=print) -> dict:
    """``build``, reusing an identical earlier build from ``cache_dir`` (keyed by config and code)."""
    import os
    import shutil

    if cache_dir is None:
        return build(out, cfg, log)
    import fcntl

    entry = cache_dir / "tiny-world" / _cache_key(cfg)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(f".{entry.name}.lock"), "w") as lock:
        # concurrent processes (test workers, stages) wait for one build instead of each training
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "world.json").exists():
            log(
                f"tiny world: no cached build in {entry}: building it (about {BUILD_MINUTES} min on 2 CPU cores), "
                "then caching it there for every later run"
            )
            tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp, cfg, log)
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        else:
            log(f"tiny world: reusing the build cached in {entry}")
    out.mkdir(parents=True, exist_ok=True)
    # world.json last: its presence tells other processes the copy is complete
    for item in sorted(entry.iterdir(), key=lambda i: i.name == "world.json"):
        dest = out / item.name
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest)
    log(f"tiny world: copied into {out}")
    report = json.loads((entry / "world.json").read_text())
    log(compare_with_record(cfg, report))
    return report


# What every machine's build of a config is expected to write (by cache key: the config, the code and the
# library versions): the weights' hashes and the accuracies. `opd tiny-models --record` adds an entry.
RECORDED_WORLDS = Path(__file__).parent / "data" / "tiny_worlds.json"
RECORDED_MODELS = ("teacher", "student-init", "student")


def recorded_world(cfg: WorldConfig) -> dict | None:
    records = json.loads(RECORDED_WORLDS.read_text()) if RECORDED_WORLDS.exists() else {}
    return records.get(_cache_key(cfg))


def world_record(report: dict) -> dict:
    """The part of a build's world.json that every machine must reproduce."""
    return {m: {k: report[m][k] for k in ("weights_sha256", "accuracy")} for m in RECORDED_MODELS}


def compare_with_record(cfg: WorldConfig, report: dict) -> str:
    """One line saying whether this build equals the recorded one for its key."""
    record, key = recorded_world(cfg), _cache_key(cfg)
    if record is None:
        return (
            f"tiny world: no recorded build for key {key} (this config, code and library versions): its numbers "
            "may differ from the published ones"
        )
    differ = [m for m in RECORDED_MODELS if record[m]["weights_sha256"] != report.get(m, {}).get("weights_sha256")]
    if differ:
        return (
            f"tiny world: WARNING: {', '.join(differ)} differ from the recorded build {key}: this machine's float "
            "kernels are not the pinned ones, so its numbers will differ from the published ones"
        )
    return f"tiny world: identical to the recorded build {key} (weights sha256 match)"


def record(cfg: WorldConfig, report: dict) -> None:
    """Add this build to ``RECORDED_WORLDS`` (a maintainer's step after changing what the world trains)."""
    records = json.loads(RECORDED_WORLDS.read_text()) if RECORDED_WORLDS.exists() else {}
    records[_cache_key(cfg)] = world_record(report)
    RECORDED_WORLDS.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd")


def config_from_json(text: str) -> WorldConfig:
    fields = json.loads(text)
    return WorldConfig(
        **{**fields, "teacher": ModelShape(**fields["teacher"]), "student": ModelShape(**fields["student"])}
    )


def main(argv: list[str] | None = None) -> int:
    """The child a build runs in: ``python -m opd_runtime.tiny_models --out DIR --config JSON``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m opd_runtime.tiny_models")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", required=True, help="a WorldConfig as JSON")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's bars would fill the build log
    build(args.out, config_from_json(args.config), log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
