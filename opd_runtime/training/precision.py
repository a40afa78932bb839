"""Numeric precision of a training stage: which dtype the weights, the optimizer state and the compute use.

Half-precision weights cannot be trained by small steps: an update smaller than half a unit in the last
place of bf16 (2^-8 relative, ~0.4%) rounds away, and at learning rates like 5e-5 most AdamW updates
are that small. So trainable weights and AdamW's moments stay float32 ("master weights") and only the
compute runs in bf16:

- one process / data parallel: trainable parameters in float32, the model's forward under
  ``torch.autocast(dtype=bfloat16)`` (matmuls in bf16, reductions and norms in float32; backward runs
  in the dtypes autocast chose);
- FSDP: float32 sharded parameters, ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)``
  (the all-gathered copies are bf16, gradients are reduced in float32);
- LoRA: the frozen base weights keep the spec dtype (bf16 saves memory and they never change), the
  adapters are float32.

Models that only run inference (teacher, evaluation, the vLLM sampler) keep the spec dtype. The stage's
final model is exported in the spec dtype; step checkpoints keep the float32 masters so that a resumed
run continues exactly.

``dtype`` -> (trainable weights, AdamW state, compute, exported model), on a GPU:

- ``bfloat16`` / ``auto``: float32, float32, bf16 autocast (FSDP: bf16 mixed precision), bf16
- ``float16``: float32, float32, float32, float16 (fp16 compute would need loss scaling; GPUs without
  bf16 train in float32 and serve in float16)
- ``float32``: float32 everywhere

On a CPU every ``dtype`` trains in float32 (``modeling.torch_dtype``); ``Precision`` can still be built
by hand with bf16 compute, as the tests do (CPU autocast in bf16 is real).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import modeling


@dataclass(frozen=True)
class Precision:
    master: torch.dtype  # trainable parameters, their gradients and the AdamW moments
    frozen: torch.dtype  # weights that never change (a LoRA base model)
    compute: torch.dtype | None  # autocast / FSDP all-gather dtype; None: compute in the master dtype
    export: torch.dtype  # the stage's final model on disk

    @property
    def mixed(self) -> bool:
        return self.compute is not None and self.compute != self.master


FP32 = Precision(torch.float32, torch.float32, None, torch.float32)


def training_precision(dtype: str, dev: torch.device) -> Precision:
    """The policy for a stage whose student has spec ``dtype``, training on ``dev`` (see the module doc)."""
    storage = modeling.torch_dtype(dtype, dev)
    if storage == torch.bfloat16:
        return Precision(torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    if storage == torch.float16:
        return Precision(torch.float32, torch.float16, None, torch.float16)
    return FP32


def attach(model, precision: Precision, dev: torch.device):
    """Put ``model`` (already loaded in ``precision.frozen`` or the master dtype) under ``precision``:
    trainable parameters in the master dtype, and - for the non-FSDP strategies - its forward under
    autocast. Returns the model; ``precision_of(model)`` reads the policy back.

    The autocast wraps the innermost Hugging Face model's ``forward`` (for a peft model the base model
    that generate() and the peft wrapper both call) and its output head's, so every forward - training
    micro-batches, the hf sampler's generate, gradient-checkpoint recomputation, a chunked loss applying
    the head to hidden states - computes in ``precision.compute`` without each call site knowing.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dtype != precision.master:
                p.data = p.data.to(precision.master)
    model._opd_precision = precision
    if precision.mixed:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.forward = _autocast_forward(inner.forward, dev.type, precision.compute)
        inner._opd_precision = precision
        # the output head too: chunked losses apply it to final hidden states outside the model's forward
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if head is not None:
            head.forward = _autocast_forward(head.forward, dev.type, precision.compute)
            # read by the chunked loss, whose plain-Linear path multiplies by the weight itself
            head._opd_compute_dtype = precision.compute
    return model


def _autocast_forward(forward, device_type: str, dtype: torch.dtype):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return forward(*args, **kwargs)

    return run


def head_compute_dtype(head: torch.nn.Module) -> torch.dtype | None:
    """The dtype ``attach`` set the output head to compute in (None: the weight's own)."""
    return getattr(head, "_opd_compute_dtype", None)


def precision_of(model) -> Precision:
    return getattr(model, "_opd_precision", FP32)


@contextlib.contextmanager
def autocast_context(model) -> Iterator[None]:
    """Autocast for code that runs parts of ``model`` outside its top-level forward (a chunked loss that
    applies ``lm_head`` itself); a no-op for float32 models and FSDP (whose policy casts the weights)."""
    precision = precision_of(model)
    if not precision.mixed or getattr(model, "_opd_fsdp", False):
        yield
        return
    dev = next(model.parameters()).device
    with torch.autocast(device_type=dev.type, dtype=precision.compute):
        yield


def export_state_dict(state: dict[str, torch.Tensor], precision: Precision) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to the export dtype (masters stay float32 in the checkpoints)."""
    return {k: v.to(precision.export) if v.is_floating_point() else v for k, v in state.items()}
