"""Teacher backends: given sampled sequences, the teacher's log-prob of every completion token.

``local`` runs the teacher in the learner's process (tiny models, tests, single-GPU debugging). The
``vllm-server`` backend (scoring over HTTP with prompt_logprobs) implements the same ``score``.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..generation import Sample
from ..training.batches import right_pad, token_logprobs


class Teacher(Protocol):
    def score(self, samples: Sequence[Sample]) -> list[list[float]]: ...


class LocalTeacher:
    def __init__(self, model, *, micro_batch_size: int = 64):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def distributions(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """Full next-token log-prob distributions (B, T, V) for an already padded batch."""
        dev = next(self.model.parameters()).device
        logits = self.model(input_ids=input_ids_BT.to(dev), attention_mask=attention_mask_BT.to(dev)).logits
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[list[float]]:
        out: list[list[float]] = []
        pad_id = 0
        dev = next(self.model.parameters()).device
        for start in range(0, len(samples), self.micro_batch_size):
            chunk = samples[start: start + self.micro_batch_size]
            batch = right_pad([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], pad_id)
            ids = batch.input_ids_BT.to(dev)
            logits = self.model(input_ids=ids, attention_mask=batch.attention_mask_BT.to(dev)).logits
            lp_BT = token_logprobs(logits, ids).cpu()
            for i, s in enumerate(chunk):
                p = len(s.prompt_ids)
                out.append(lp_BT[i, p: p + len(s.completion_ids)].tolist())
        return out
