"""Resuming puts each rank's state on the rank's own device, whatever device wrote the checkpoint.

Rank 0 alone writes ``trainer_state.pt``; on GPUs every tensor in it is tagged ``cuda:0``. Two gloo
processes here resume from such a file: it is written through ``torch.serialization``'s own tagging,
so its bytes are those a GPU rank 0 writes, and a registered deserializer records the location each
storage is restored to on each rank (the device ``torch.load`` was told to use), then leaves the
restoring itself to torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.serialization

from opd_runtime.training import checkpoint

from support.processes import free_port

WORLD = 2


def _tag_as_gpu_rank_0(storage) -> str | None:
    """Tag every storage as the GPU rank 0 of a run writes it (the first tagger consulted wins)."""
    return "cuda:0" if os.environ.get("OPD_TEST_TAG_CUDA0") == "1" else None


_restored_to: list[str] = []


def _record_location(_storage, location: str):
    _restored_to.append(location)
    return None  # torch's own deserializers do the restoring


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def _resume_on_rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.serialization.register_package(0, _tag_as_gpu_rank_0, _record_location)
    path = Path(folder)
    try:
        if rank == 0:
            model, optimizer, scheduler = _model_and_optimizer(0)
            model(torch.ones(2, 4)).sum().backward()
            optimizer.step()
            scheduler.step()
            state = {"step": 7, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            state["rng"] = checkpoint.rng_state()
            os.environ["OPD_TEST_TAG_CUDA0"] = "1"
            torch.save(state, path / checkpoint.STATE_FILE)
            os.environ["OPD_TEST_TAG_CUDA0"] = "0"
            torch.save(optimizer.state_dict(), path / f"expected-{rank}.pt")
        dist.barrier()
        model, optimizer, scheduler = _model_and_optimizer(rank + 1)
        _restored_to.clear()
        assert checkpoint.restore(path, optimizer, scheduler) == 7
        own = "cpu"  # a gloo rank's device (a GPU rank's is cuda:LOCAL_RANK: the optimizer moves it there)
        assert _restored_to and set(_restored_to) == {own}, f"rank {rank} restored storages to {set(_restored_to)}"
        expected = torch.load(path / "expected-0.pt", weights_only=False)
        for p_id, moments in optimizer.state_dict()["state"].items():
            for key, value in moments.items():
                assert value.device == next(model.parameters()).device
                torch.testing.assert_close(value, expected["state"][p_id][key], rtol=0, atol=0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_a_checkpoint_written_on_gpu_0_onto_its_own_device(tmp_path):
    mp.spawn(_resume_on_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
