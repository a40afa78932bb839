"""Attention over packed rows with no T x T mask: sdpa run once per trace ("varlen"), on GPUs and CPUs
(opd does not use the flash-attn package: ``activations.use_fast_attention`` says why).

A packed row holds several traces, told apart by position ids that restart at 0 (``sft.packing``). Given
such a row, transformers' ``sdpa`` builds a boolean block-diagonal causal mask of T x T per row (256 MiB at
16k tokens), and because a mask is present it also copies the keys and values to every query head (no
grouped-query sdpa with a mask). One Qwen3 attention layer at Qwen3-1.7B's widths (16 heads, 8 KV heads,
head_dim 128) on a 16,384-token row of 4 traces, forward and backward, measured +2.44 GiB and 439 s that
way against +1.33 GiB and 119 s here (``bench/memory.py --cases attn-naive-16384,attn-new-16384``).

``sdpa_varlen`` does what flash-attention's varlen mode does: it takes where the position ids restart (the
traces' cu_seqlens, found once per forward on the host: ``row_trace_starts``) and calls
``scaled_dot_product_attention`` with ``is_causal=True`` on each trace's slice of queries, keys and values
(``enable_gqa``: no key/value copies), so nothing of size T x T exists. The result is the same attention
(float rounding apart): a token sees exactly the earlier tokens of its own trace. Everything else goes to
transformers' own sdpa unchanged: a 2D padding mask (as ``generate`` passes), a query shorter than its keys
(decoding with a cache), non-causal attention.

``register()`` adds the implementation to transformers' ``AttentionInterface`` and a mask builder to its
``AttentionMaskInterface`` that builds no mask where this function needs none (and sdpa's mask wherever
it delegates to sdpa); ``training.activations.use_fast_attention`` chooses it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"
# Keyword under which ``chunked.final_hidden_states`` hands every attention layer the traces of each row,
# found once per forward on the host (``row_trace_starts``); the model's forward passes it through.
TRACE_STARTS = "opd_trace_starts"


def trace_starts(position_ids_T: torch.Tensor) -> list[int]:
    """Where each trace of one row begins: index 0 and every position whose id is not its predecessor's
    plus one (transformers' rule in ``find_packed_sequence_indices``), then T."""
    T = position_ids_T.shape[0]
    restarts = (torch.diff(position_ids_T) != 1).nonzero().flatten() + 1
    return [0, *restarts.tolist(), T]


def row_trace_starts(position_ids_BT: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """``trace_starts`` of every row, from one read of the position ids into host memory (none at all when
    they are there already, as the packer makes them), so that no layer has to wait for the device."""
    out = []
    for pos in position_ids_BT.tolist():
        restarts = [t for t in range(1, len(pos)) if pos[t] != pos[t - 1] + 1]
        out.append((0, *restarts, len(pos)))
    return tuple(out)


def sdpa_varlen_forward(
    module: torch.nn.Module,
    query_BHTd: torch.Tensor,
    key_BKSd: torch.Tensor,
    value_BKSd: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention of each trace on its own; returns (B, T, H, d) as transformers' sdpa does.

    H query heads, K key/value heads (K divides H), T queries, S keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, T, _ = query_BHTd.shape
    given_rows = kwargs.pop(TRACE_STARTS, None)
    is_causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is not None or key_BKSd.shape[2] != T or not causal or T <= 1:
        # a padding mask, a cache, bidirectional attention, one query: what sdpa itself does
        return sdpa_attention_forward(
            module, query_BHTd, key_BKSd, value_BKSd, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if sliding_window is not None and sliding_window < T:
        # the mask builder built no window mask (nothing here applies one): refuse rather than over-attend
        raise NotImplementedError(
            f"{NAME}: sliding-window attention ({sliding_window} < {T} tokens) is not supported; use sdpa"
        )
    gqa = key_BKSd.shape[1] != H

    def attend(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        return out.transpose(1, 2)  # (b, t, H, d)

    if given_rows is not None and len(given_rows) == B and all(starts[-1] == T for starts in given_rows):
        rows = [list(starts) for starts in given_rows]
    elif position_ids is None:
        rows = [[0, T]] * B
    else:  # a caller that did not find the traces itself: found here, at a device sync per layer
        pos_BT = position_ids.expand(B, -1) if position_ids.shape[0] != B else position_ids
        rows = [trace_starts(pos_BT[b]) for b in range(B)]
    if all(len(starts) == 2 for starts in rows):  # no row is packed: one call for the whole batch
        return attend(query_BHTd, key_BKSd, value_BKSd).contiguous(), None
    out_rows = []
    for b, starts in enumerate(rows):
        q, k, v = query_BHTd[b : b + 1], key_BKSd[b : b + 1], value_BKSd[b : b + 1]
        pieces = [attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in itertools.pairwise(starts)]
        out_rows.append(torch.cat(pieces, dim=1))  # (1, T, H, d), traces in row order
    return torch.cat(out_rows, dim=0), None


def varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """No mask where ``sdpa_varlen_forward`` splits the row itself (causal self-attention without padding
    mask, cache or window, packed or not); sdpa's own mask everywhere else."""
    from transformers.masking_utils import sdpa_mask

    own = (
        attention_mask is None
        and q_length == kv_length
        and q_offset == 0
        and kv_offset == 0
        and kwargs.get("local_size") is None
        and not kwargs.get("allow_is_bidirectional_skip", False)
    )
    if own:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register() -> str:
    """Make ``NAME`` a valid ``attn_implementation`` in this process (idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME
