"""Turning chats into token tensors.

A prompt is the conversation up to and including the assistant header (``add_generation_prompt``), and a
completion is the assistant's text plus the end-of-turn token, tokenized separately and concatenated.
That is exactly how sampled completions are laid out, so SFT and OPD see one format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def prompt_ids(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **template_kwargs)
    # transformers 5 returns a BatchEncoding here; 4.x returned the list itself.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def completion_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class PackedBatch:
    """Right-padded sequences with a mask over the tokens that carry loss."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor  # 1 where the token at t is a completion token (predicted from t-1)

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask_BT.sum())


def right_pad(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T = max(lengths)
    B = len(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    loss = torch.zeros((B, T), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        loss[b, len(p) : len(seq)] = 1.0
    return PackedBatch(ids, attn, loss)


def length_groups(
    lengths: Sequence[int], *, max_count: int, max_tokens: int | None = None, packed: bool = False
) -> list[list[int]]:
    """Indices of sequences grouped into micro-batches: at most ``max_count`` sequences and, when
    ``max_tokens`` is set, at most that many tokens each. Every index appears exactly once.

    Padded micro-batches (``packed=False``) cost rows x longest row: sequences are taken longest first, so
    the ones sharing a micro-batch have similar lengths and padding stays small. Packed micro-batches
    (one row of concatenated sequences) cost the sum of the lengths: first-fit decreasing. A sequence
    longer than ``max_tokens`` gets a micro-batch of its own. The grouping does not change a step's loss
    or gradient: losses are sums over tokens, normalised by the whole step's token count.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    budget = max_tokens if max_tokens is not None else float("inf")
    groups: list[list[int]] = []
    if packed:
        used: list[int] = []
        for i in order:
            for g, group in enumerate(groups):
                if len(group) < max_count and used[g] + lengths[i] <= budget:
                    group.append(i)
                    used[g] += lengths[i]
                    break
            else:
                groups.append([i])
                used.append(lengths[i])
        return groups
    for i in order:
        # sorted longest first: a group's first sequence is its longest, so its cost is that x its size
        if groups and len(groups[-1]) < max_count and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def token_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each token given the tokens before it; position 0 gets 0 (dense reference on full
    logits, for tests and small models; the stages use ``training.chunked``).

    Computed per row of the vocabulary in float32 so bf16 models do not lose precision in the softmax.
    """
    logits = logits_BTV[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(lp, (1, 0), value=0.0)
