"""Atomic, resumable checkpoints.

A checkpoint is a directory ``step-NNNNNN/`` holding ``model/`` (full weights, or the LoRA adapter) and
``trainer_state.pt`` (optimizer, scheduler, RNG states and the data position). An FSDP run
(``sharding``) writes ``dcp/`` instead of ``model/`` and the optimizer: every rank's shards of both, in
``torch.distributed.checkpoint``'s format, plus the tokenizer in ``tokenizer/``. It is written under a
temporary name and renamed into place, and ``latest`` (a one-line file, also replaced atomically) names
the newest complete one, so a process killed at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, sharding

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # GPU sampling draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(root: Path, step: int, *, model, tokenizer, optimizer, scheduler, extra: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step``: called by rank 0 alone, or by every rank for a sharded (FSDP) model."""
    if sharding.is_sharded(model):
        return _save_sharded(
            root,
            step,
            model=model,
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            extra=extra,
            keep=keep,
        )
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            **extra,
        },
        tmp / STATE_FILE,
    )
    return _publish(root, tmp, final, keep)


def _save_sharded(
    root: Path, step: int, *, model, tokenizer, optimizer, scheduler, extra: dict[str, Any], keep: int
) -> Path:
    final = step_dir(root, step)
    # one temporary folder for all ranks (rank 0's pid names it), renamed once every rank has written
    tmp = root / distributed.broadcast_object(f".{final.name}.tmp-{os.getpid()}")
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    sharding.save_sharded(tmp, model, optimizer)
    distributed.barrier()
    if not distributed.is_main():
        return final
    tokenizer.save_pretrained(tmp / "tokenizer")
    # per-rank RNG streams are reseeded every step from (seed, step, rank): no RNG state to keep
    torch.save({"step": step, "scheduler": scheduler.state_dict(), **extra}, tmp / STATE_FILE)
    return _publish(root, tmp, final, keep)


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> Path:
    if final.exists():  # a previous attempt reached this step; the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic_text(root / LATEST, final.name + "\n")
    _prune(root, keep)
    return final


def latest(root: Path) -> Path | None:
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def resumable(root: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuses to start over a workspace that already has one."""
    from ..spec import SpecError

    existing = latest(root)
    if existing is not None and not resume:
        raise SpecError(
            f"{root} already holds checkpoints ({existing.name}); pass --resume to continue "
            "that run, or use a fresh workspace"
        )
    return existing


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, weights_only=False)


def restore(path: Path, optimizer, scheduler, model=None) -> int:
    """Load optimizer, scheduler and RNG state from checkpoint ``path``; returns its step.

    A sharded checkpoint (``dcp/``) also holds the model's weights: they are loaded into ``model``
    (sharded or not: DCP reshards to this run's layout). A full checkpoint resumed by a sharded run (a
    run continued on more processes) had its weights loaded by ``build_trainable``; its optimizer state
    is sharded here.
    """
    state = load_state(path)
    if sharding.has_sharded(path):
        if model is None:
            raise ValueError(f"{path} is a sharded checkpoint: restore() needs the model")
        sharding.load_sharded(path, model, optimizer)
    elif model is not None and sharding.is_sharded(model):
        sharding.load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        set_rng_state(state["rng"])
    return state["step"]


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by killed writers
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
