"""Data-parallel training stages under torchrun: ``torchrun --nproc-per-node N opd sft|distill ...``.

Each of the N processes (ranks) holds a full copy of the trainable model and works on a disjoint share
of every step's global batch: SFT splits the step's ``batchSize`` traces, the OPD learner the step's
``promptsPerStep`` prompts (each rank samples, scores and trains on its own prompts). After the backward
passes, gradients are summed across ranks and the loss normaliser is the step's *global* token count,
so N processes compute the gradient one process would compute on the whole batch; every rank then
takes the same optimizer step and the copies stay identical.

Why a manual all-reduce of the accumulated gradients instead of DistributedDataParallel: the ranks may
run different numbers of micro-batches in a step (uneven shares, packed rows, no samples at all), which
DDP's one-all-reduce-per-backward cannot match without hanging; a single reduction after accumulation
works for any share, for full and LoRA (peft) models and for the 4D packed attention masks alike. The
lost overlap of communication with the backward pass is small next to sampling in OPD.

Rank 0 alone writes checkpoints, metrics, results and the final export, and serves Prometheus. RNG:
in a multi-process run every rank reseeds its generators at the start of each step from (seed, step,
rank), so ranks sample differently and a resumed run continues exactly, whatever checkpoint it starts
from. A single process (no ``WORLD_SIZE`` > 1) creates no process group and runs as if this module did
not exist: every function here is then a no-op or the identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")

BUCKET_BYTES = 64 << 20  # gradients are summed in flat buffers of at most this size
# A collective that waits longer than this fails instead of hanging (torchrun also tears the group down
# as soon as one rank dies). Generous: a rank may wait for another one's long sampling phase.
TIMEOUT = timedelta(minutes=int(os.environ.get("OPD_DIST_TIMEOUT_MINUTES", "30")))


def launched() -> bool:
    """Started by torchrun (or another launcher that sets ``WORLD_SIZE``) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes the stage's files and prints its progress."""
    return rank() == 0


def local_device(dev: torch.device) -> torch.device:
    """This process's own device: ``dev`` with the launcher's ``LOCAL_RANK`` (0 for one process) as its
    index when it is a GPU named without one (``torch.cuda.set_device`` refuses ``cuda`` alone); ``dev``
    itself otherwise."""
    if dev.type != "cuda" or dev.index is not None:
        return dev
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Join torchrun's process group for the duration of a stage (nothing for a single process).

    NCCL on GPUs (each rank on the GPU ``LOCAL_RANK``), gloo on CPUs. On a clean exit the ranks meet
    once more, so none leaves while rank 0 still writes; after an exception the group is torn down
    without waiting for the others (torchrun then stops the remaining ranks).
    """
    if not launched() or active():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device(torch.device("cuda")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise
    barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _device() -> torch.device:
    """Where collective buffers live: the rank's GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """[start, end) of rank ``rank_``'s contiguous share of ``n`` items; the first ``n % world`` get one more."""
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def share(items: Sequence[T]) -> list[T]:
    """This rank's share of a step's global batch (all of it for a single process)."""
    start, end = share_bounds(len(items), rank(), world_size())
    return list(items[start:end])


def all_sum(*values: float) -> list[float]:
    """Each value summed over all ranks (float64), in one collective; the values themselves for one process."""
    if not active():
        return [float(v) for v in values]
    buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(buf)
    return buf.tolist()


def all_max(value: float) -> float:
    """The largest ``value`` over all ranks."""
    if not active():
        return float(value)
    buf = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return float(buf.item())


def _sharded(model) -> bool:
    return bool(getattr(model, "_opd_fsdp", False))


def all_reduce_gradients(model) -> None:
    """Sum the accumulated gradients of the trainable parameters over all ranks, in place.

    A parameter without a gradient (a rank with no data this step) contributes zeros, so every rank runs
    the same collectives. With the loss divided by the global token count, the sum is the gradient of
    the whole step's loss. An FSDP model (``sharding``) has already reduce-scattered its gradients in
    backward: nothing to do.
    """
    if not active() or _sharded(model):
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        at = 0
        for p in bucket:
            p.grad.copy_(flat[at : at + p.numel()].view_as(p.grad))
            at += p.numel()


def _buckets(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or p.dtype != bucket[0].dtype or p.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


def broadcast_parameters(model) -> None:
    """Make every rank start from rank 0's trainable weights (fresh LoRA adapters are random; frozen
    weights come from the same files on every rank). FSDP shards differ per rank by design: skipped."""
    if not active() or _sharded(model):
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def step_seed(seed: int, step: int, rank_: int) -> int:
    digest = hashlib.sha256(f"opd/{seed}/{step}/{rank_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def seed_step(seed: int, step: int) -> None:
    """Multi-process runs: seed this rank's generators for ``step`` (0-based) from (seed, step, rank), so
    ranks draw different samples and a resumed run draws what the uninterrupted one drew. A single
    process keeps the one stream that its checkpoints save and restore."""
    if not active():
        return
    s = step_seed(seed, step, rank())
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # CUDA generators included
