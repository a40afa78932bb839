"""Atomic, resumable checkpoints.

A checkpoint is a directory ``step-NNNNNN/`` holding ``model/`` (full weights, or the LoRA adapter) and
``trainer_state.pt`` (optimizer, scheduler, RNG states and the data position). An FSDP run
(``sharding``) writes ``dcp/`` instead of ``model/`` and the optimizer: every rank's shards of both, in
``torch.distributed.checkpoint``'s format, plus the tokenizer in ``tokenizer/``. It is written under a
temporary name and renamed into place, and ``latest`` (a one-line file, also replaced atomically) names
the newest complete one, so a process killed at any moment leaves the previous checkpoint usable: a step
written again (an earlier attempt got as far) is set aside, not deleted, until ``latest`` names its
replacement.

``spec-fingerprint.json`` beside them (``opd_runtime/fingerprint.py``) records the spec fields that give
a checkpoint its meaning; a stage resuming checkpoints written for other values of them refuses (exit 2), so a
run re-created with another spec over a retained workspace does not silently continue the old one.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import fingerprint
from . import distributed, sharding

STATE_FILE = "trainer_state.pt"
LATEST = "latest"
# A checkpoint being replaced by a rewrite of its step waits under this name until `latest` moves on.
_ASIDE = ".{name}.old-{pid}"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # GPU sampling draws from this process's own GPU's generator; the *_all variants would open a
        # CUDA context on every visible GPU from every rank
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    for _ in publish_steps(root, tmp, final):
        pass
    _prune(root, keep, protect=final)
    return final


def publish_steps(root: Path, tmp: Path, final: Path) -> Iterator[str]:
    """Make the complete checkpoint in ``tmp`` the checkpoint ``final`` and ``latest``: one filesystem
    operation per yield, ordered so that a crash after any of them leaves ``latest()`` a complete
    checkpoint (the new one, or the one it was about to replace)."""
    aside = None
    if final.exists():
        # An earlier attempt reached this step, and `latest` may name it (it died before writing the next
        # one, or between its rename and `latest`): keep it whole until `latest` names the new one.
        aside = root / _ASIDE.format(name=final.name, pid=os.getpid())
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        yield "set the earlier checkpoint of this step aside"
    os.replace(tmp, final)
    yield "renamed into place"
    write_atomic_text(root / LATEST, final.name + "\n")
    yield "latest switched"
    if aside is not None:
        shutil.rmtree(aside)
        yield "earlier checkpoint deleted"


def _complete(path: Path) -> bool:
    return (path / STATE_FILE).exists()


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, or, when a crash left it set aside mid-replacement, that one."""
    marker = root / LATEST
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    path = root / name
    if _complete(path):
        return path
    asides = sorted(p for p in root.glob(_ASIDE.format(name=name, pid="*")) if _complete(p))
    return asides[-1] if asides else None


def resumable(root: Path, resume: bool, run=None, stage: str | None = None) -> Path | None:
    """The checkpoint to resume from; refuses to start over a workspace that already has one. Given the
    ``run`` and its ``stage``, also refuses checkpoints written for other values of the fields that shape
    them (``fingerprint.check``), and records this run's values for the checkpoints it is about to write."""
    from ..spec import SpecError

    existing = latest(root)
    if existing is not None and not resume:
        raise SpecError(
            f"{root} already holds checkpoints ({existing.name}); pass --resume to continue "
            "that run, or use a fresh workspace"
        )
    if run is not None and stage is not None:
        values = fingerprint.shaping_values(run, stage)
        if existing is not None:
            fingerprint.check(root, stage, values)
        if distributed.is_main():
            fingerprint.record(root, values)
    return existing


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``, every tensor in CPU memory.

    Rank 0 of a GPU run wrote it, so its tensors name ``cuda:0``: loaded as written, every rank would put
    a whole copy of the optimizer state on GPU 0. On the CPU (the RNG states must be there anyway),
    ``optimizer.load_state_dict`` then moves each moment to its parameter's device, the rank's own. Memory
    mapped, so the ranks of one node share the file's pages instead of each reading a copy."""
    return torch.load(path / STATE_FILE, map_location="cpu", mmap=True, weights_only=False)


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


def _prune(root: Path, keep: int, protect: Path) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        if old != protect:  # `latest`, even when steps of an abandoned attempt lie beyond it
            shutil.rmtree(old, ignore_errors=True)
    # left by killed writers; once `latest` names a complete checkpoint no set-aside copy is needed
    for stale in [*root.glob(".step-*.tmp-*"), *root.glob(_ASIDE.format(name="step-*", pid="*"))]:
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
