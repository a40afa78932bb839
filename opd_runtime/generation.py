"""Sampling completions from a Hugging Face causal LM (the ``hf`` sampler backend).

Returns, for every sample, the completion's token ids (ending at the first stop token, which is kept)
and the log-prob the sampler assigned to each of them under the distribution it actually sampled from
(temperature and top-p applied), which is the behaviour policy of the importance-sampling loss.

Those log-probs are gathered as decoding goes (``ChosenTokenLogprobs``): one step's full-vocabulary
distribution is alive at a time, not every step's (``output_scores`` kept them all: ~156 MB per decoding
step at batch 256 with Qwen3's 152k vocabulary, tens of GB for a long completion). This backend is for
CPU and tiny models; long generations belong to the ``vllm`` backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finished: bool = True  # False when cut by max_new_tokens before a stop token


@dataclass(frozen=True)
class SamplingArgs:
    """How completions are drawn, whichever sampler draws them (``sample`` here, ``vllm_engine``'s
    ``engine_sample`` and the ``VllmSampler`` over it). The field names are ``sample``'s keyword arguments."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 or less: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    logprobs: bool = True  # the sampler's log-prob of each completion token (evaluation needs none)


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


class ChosenTokenLogprobs(LogitsProcessor):
    """The last logits processor of ``generate``: keeps the log-softmax of the scores the next token is
    drawn from, and at the next call (when that token is the last column of ``input_ids``) gathers the
    chosen token's log-prob. ``finish`` gathers the last step's from the final sequences."""

    def __init__(self):
        self.pending_BV: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []  # one (B,) tensor per decoding step

    def __call__(self, input_ids, scores):
        if self.pending_BV is not None:
            self.chosen.append(self.pending_BV.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending_BV = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_BT: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probs of the ``T`` generated tokens ``new_BT``. On an accelerator, generate may run
        a step or two past the stop and undo them (its deferred stop check): those steps come last and
        are dropped."""
        steps = new_BT.shape[1]
        if len(self.chosen) < steps and self.pending_BV is not None:
            last_B1 = new_BT[:, -1:].to(self.pending_BV.device)
            self.chosen.append(self.pending_BV.gather(-1, last_B1).squeeze(-1))
        self.pending_BV = None
        if len(self.chosen) < steps:
            raise RuntimeError(f"recorded {len(self.chosen)} decoding steps for {steps} new tokens")
        chosen, self.chosen = self.chosen[:steps], []
        return torch.stack(chosen, dim=1).cpu() if chosen else torch.zeros(new_BT.shape)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 256,
    logprobs: bool = True,
) -> list[Sample]:
    """``n`` completions for each prompt, grouped prompt by prompt (prompt 0's n samples first).

    ``logprobs=False`` skips the per-token log-probs (``Sample.logprobs`` stays empty): evaluation does
    not need them.
    """
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    rows = [list(p) for p in prompts for _ in range(n)]
    greedy = temperature <= 0
    # The temperature and top-p warpers are passed as processors (generate itself gets neutral values and
    # adds none) so that the recorder can run after them: generate appends its own warpers after every
    # processor it is given. The order, and so every sample, is the same as generate's own.
    warpers: list[LogitsProcessor] = []
    if not greedy:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    was_training = model.training
    model.eval()
    out: list[Sample] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, r in enumerate(chunk):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            attention[i, width - len(r) :] = 1
        recorder = ChosenTokenLogprobs() if logprobs else None
        processors = LogitsProcessorList(warpers + ([recorder] if recorder is not None else []))
        dev = next(model.parameters()).device
        gen = model.generate(
            input_ids=input_ids.to(dev),
            attention_mask=attention.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else 1.0,
            top_p=None if greedy else 1.0,
            top_k=None if greedy else 0,
            logits_processor=processors,
            eos_token_id=stops,
            pad_token_id=pad_id,
            return_dict_in_generate=True,
        )
        new_BT = gen.sequences[:, width:].cpu()
        tok_logp_BT = recorder.finish(new_BT) if recorder is not None else None
        for i, r in enumerate(chunk):
            ids = new_BT[i].tolist()
            end = next((t + 1 for t, tok in enumerate(ids) if tok in stops), None)
            finished = end is not None
            end = end or len(ids)
            lps = tok_logp_BT[i, :end].tolist() if tok_logp_BT is not None else []
            out.append(Sample(r, ids[:end], lps, finished))
    if was_training:
        model.train()
    return out
