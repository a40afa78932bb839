"""Activation memory of a training model: gradient checkpointing and the attention implementation.

Small hooks the stages call on the model that ``model_setup.build_trainable`` returns (and on a local
teacher), kept apart from model building so that sharding and precision can change independently.
"""

from __future__ import annotations

from . import attention
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
    """The mask-free attention for packed rows; returns the implementation in use.

    ``sdpa_varlen`` (``training.attention``), on GPUs and CPUs alike: sdpa run once per trace of a packed
    row, which builds no T x T mask; rows that are not packed, padding masks and cached decoding run as
    plain sdpa. Models with sliding-window layers or not causal keep sdpa. Not ``flash_attention_2``: the
    ``flash-attn`` package has no prebuilt wheel on the package index (vLLM ships its own kernels), so
    the GPU image does not have it, and one path serves every device.
    """
    base = base_model(model)
    cfg = base.config
    current = getattr(cfg, "_attn_implementation", None) or "eager"
    if getattr(cfg, "is_causal", True) and not _has_sliding_layers(cfg):
        wanted = attention.register()
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


def _has_sliding_layers(cfg) -> bool:
    """Whether any layer attends within a window (``sdpa_varlen`` applies none)."""
    types = getattr(cfg, "layer_types", None) or []
    return any(t != "full_attention" for t in types) or (
        getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None) is not None
    )
