"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for full fine-tuning on several processes.

With ``strategy: fsdp`` every rank holds 1/N of the float32 weights, gradients and AdamW moments instead
of a full copy: each decoder layer is its own FSDP unit (all-gathered just before its forward and
backward, resharded after), the root unit holds the embeddings, final norm and the (tied) output head.
On a GPU the all-gathered copies are bf16 and gradients are reduce-scattered in float32
(``MixedPrecisionPolicy``); see ``precision``.

What changes for the loop:

- gradients: FSDP reduce-scatters them in backward, so ``distributed.all_reduce_gradients`` is a no-op,
  and the reduction is a sum (gradient divide factor 1), because the losses are already divided by the
  step's global token count, as with DDP;
- every rank must run the same number of forward/backward passes (each pass all-gathers): ``lockstep``
  pads a rank with fewer micro-batches with zero-weight passes;
- checkpoints: ``torch.distributed.checkpoint`` (DCP), each rank writing its shards of the model and the
  optimizer into ``step-N/dcp/``; DCP reshards on load, so a run can resume with a different number of
  processes (or one);
- the final model: the full state dict gathered on rank 0 in CPU memory, saved in the usual Hugging Face
  layout.

``auto`` (the default) shards when there is something to gain: full fine-tuning on more than one
process. LoRA stays data parallel: its trainable state is small and the frozen base is needed whole. So
does a distill stage with the vllm sampler (``stage_strategy``): its engines would need gathered weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

# decided in the spec layer, torch-free, where the memory plan reads them too
from ..spec.stages import resolve_strategy, stage_strategy  # noqa: F401
from . import distributed
from .precision import Precision

T = TypeVar("T")

DCP_DIR = "dcp"


def is_sharded(model) -> bool:
    return bool(getattr(model, "_opd_fsdp", False))


def shard(model, precision: Precision, dev: torch.device):
    """``fully_shard`` each decoder layer, then the root; the model is moved to ``dev`` shard by shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(precision.master)
    mesh = init_device_mesh(dev.type, (distributed.world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=torch.float32)
        if precision.mixed
        else MixedPrecisionPolicy()
    )
    # the decoder layer classes are the ones the model says must not be split across devices
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers ({sorted(layer_classes)}) to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # a plain sum (the losses are already per global token): factor 1 with sum-only collectives,
            # which also keeps gloo working (it has no PREMUL_SUM)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    model._opd_fsdp = True
    model._is_fsdp_managed_module = True  # transformers' generate() then keeps the ranks in step (synced_gpus)
    model._opd_precision = precision  # no autocast wrapper: the FSDP policy casts the gathered weights
    return model


def lockstep(items: Iterable[T], model) -> Iterator[T]:
    """Yield ``items`` (this rank's micro-batches); for a sharded model, then run zero-weight passes until
    this rank has made as many forward/backward passes as the rank with the most micro-batches.

    Without this, a rank with fewer micro-batches (uneven shares, token-budget batching) would leave the
    others waiting forever in their next all-gather. Data-parallel and single-process runs just iterate.
    """
    items = list(items)
    if not is_sharded(model):
        yield from items
        return
    most = int(distributed.all_max(len(items)))
    yield from items
    for _ in range(most - len(items)):
        zero_weight_pass(model)


def zero_weight_pass(model) -> None:
    """One forward/backward through every FSDP unit that adds nothing to the gradients."""
    dev = next(model.parameters()).device
    out = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=dev))
    (out.logits.float().sum() * 0.0).backward()


def save_sharded(path: Path, model, optimizer) -> None:
    """Every rank writes its shards of the model and the optimizer state into ``path/dcp``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / DCP_DIR))


def has_sharded(path: Path) -> bool:
    return (path / DCP_DIR).is_dir()


def load_sharded(path: Path, model, optimizer) -> None:
    """Model and optimizer state from ``path/dcp``, resharded to this run's layout (sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=not distributed.active())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_optimizer_state(model, optimizer, full: dict) -> None:
    """An unsharded optimizer's ``state_dict()`` (keyed by parameter index) loaded into this sharded one.

    The index is the position among the trainable parameters in ``named_parameters`` order, which
    ``fully_shard`` keeps; every rank takes its shard of each moment."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = {
        "state": {names[i]: v for i, v in full["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in full["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (a collective: every rank calls it; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
