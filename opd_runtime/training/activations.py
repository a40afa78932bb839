"""Activation memory of a training model: gradient checkpointing and the attention implementation.

Small hooks the stages call on the model that ``model_setup.build_trainable`` returns (and on a local
teacher), kept apart from model building so that sharding and precision can change independently.
"""

from __future__ import annotations

import importlib.util

from .chunked import base_model


def use_gradient_checkpointing(model, enabled: bool) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (train mode only).

    Non-reentrant checkpointing: it needs no input that requires grad and keeps the autograd graph
    intact across the checkpoint. With LoRA the embeddings are frozen, so their output does not require
    grad; ``enable_input_require_grads`` makes it do so anyway, so that the reentrant variant (or any
    wrapper that still uses it) also gives the adapters inside checkpointed blocks their gradients.
    """
    base = base_model(model)
    if enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        base.config.use_cache = False  # a cache would switch packing detection off (and is useless in training)
    elif base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()


def use_fast_attention(model, log=None) -> str:
    """The mask-free attention for packed rows where there is one, else sdpa; returns the one in use.

    On CUDA with the ``flash-attn`` package: ``flash_attention_2``, which takes packed rows as varlen
    sequences (cu_seqlens derived from the restarted position ids) with no mask at all. On CPU, or
    without it: ``sdpa``, which is exact on packed rows but builds a boolean T x T mask per row.
    """
    base = base_model(model)
    current = getattr(base.config, "_attn_implementation", None) or "eager"
    on_cuda = any(p.is_cuda for p in base.parameters())
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        wanted = "flash_attention_2"
    else:
        wanted = "sdpa"
    if current != wanted:
        try:
            base.set_attn_implementation(wanted)
            current = wanted
        except (ImportError, ValueError) as err:  # an architecture without it: keep what it has
            if log:
                log(f"attention: keeping {current} ({wanted} unavailable: {err})")
    return current
