"""Teacher backends: given sampled sequences, the teacher's log-prob of every completion token, and for the
full-distribution losses its next-token distributions.

``local`` runs the teacher in the learner's process (tiny models, tests, single-GPU debugging). The
``vllm-server`` backend (scoring over HTTP with prompt_logprobs, ``server_teacher.py``) implements the
same protocol with top-k lists instead of full distributions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..generation import Sample
from ..training import chunked
from ..training.batches import length_groups, right_pad
from .loss import TopKLogprobs


@dataclass
class TeacherHidden:
    """A local teacher's full next-token distributions, held as its final hidden states (B, T, D) and its
    output head: ``training.chunked.token_terms`` turns them into log-probs one chunk of tokens at a time
    (never a (B, T, V) tensor). Position t predicts token t + 1."""

    hidden_BTD: torch.Tensor
    head: torch.nn.Module


class Teacher(Protocol):
    """Everything the learner calls on a teacher."""

    # True when ``kl_targets`` also yields what ``score`` returns (the sampled tokens' log-probs can be
    # read from it): a learner with a full-distribution loss then skips ``score`` and runs the teacher
    # once per micro-batch instead of twice.
    scores_from_kl_targets: bool

    def score(self, samples: Sequence[Sample]) -> list[list[float]]:
        """The teacher's log-prob of every completion token of every sample."""
        ...

    def kl_targets(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> TopKLogprobs | TeacherHidden:
        """Next-token distributions for a right-padded batch, for the full-distribution losses."""
        ...


class LocalTeacher:
    scores_from_kl_targets = True

    def __init__(self, model, *, micro_batch_size: int = 64, max_tokens_per_micro_batch: int | None = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.forwards = 0  # forward passes run (the learner runs one per micro-batch)

    @torch.no_grad()
    def kl_targets(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> TeacherHidden:
        """Final hidden states of a right-padded batch (no attention mask: right padding under a causal
        mask never reaches a real token) and the head to apply to them chunk by chunk."""
        dev = next(self.model.parameters()).device
        self.forwards += 1
        return TeacherHidden(
            chunked.final_hidden_states(self.model, input_ids_BT.to(dev)), chunked.output_head(self.model)
        )

    @torch.no_grad()
    def distributions(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """Full next-token log-prob distributions (B, T, V) in fp32: the dense reference, for tests and
        small models; the learner uses ``kl_targets``."""
        dev = next(self.model.parameters()).device
        logits = self.model(input_ids=input_ids_BT.to(dev), attention_mask=attention_mask_BT.to(dev)).logits
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[list[float]]:
        out: list[list[float] | None] = [None] * len(samples)
        pad_id = 0
        dev = next(self.model.parameters()).device
        lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
        for group in length_groups(
            lengths, max_count=self.micro_batch_size, max_tokens=self.max_tokens_per_micro_batch
        ):
            chunk = [samples[i] for i in group]
            batch = right_pad([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], pad_id)
            self.forwards += 1
            lp_BT = chunked.sequence_logprobs(self.model, batch.input_ids_BT.to(dev), batch.loss_mask_BT.to(dev)).cpu()
            for b, (i, s) in enumerate(zip(group, chunk)):
                p = len(s.prompt_ids)
                out[i] = lp_BT[b, p : p + len(s.completion_ids)].tolist()
        return out  # type: ignore[return-value]
