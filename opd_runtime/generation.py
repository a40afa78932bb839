"""Sampling completions from a Hugging Face causal LM (the ``hf`` sampler backend).

Returns, for every sample, the completion's token ids (ending at the first stop token, which is kept)
and the log-prob the sampler assigned to each of them under the distribution it actually sampled from
(temperature and top-p applied), which is the behaviour policy of the importance-sampling loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finished: bool = True  # False when cut by max_new_tokens before a stop token


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[Sequence[int]], *, n: int = 1, temperature: float = 1.0,
           top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 256,
           logprobs: bool = True) -> list[Sample]:
    """``n`` completions for each prompt, grouped prompt by prompt (prompt 0's n samples first).

    ``logprobs=False`` skips the per-token log-probs (``Sample.logprobs`` stays empty): evaluation does
    not need them, and keeping every step's full-vocabulary scores costs memory that grows with length.
    """
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    rows = [list(p) for p in prompts for _ in range(n)]
    was_training = model.training
    model.eval()
    out: list[Sample] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, r in enumerate(chunk):
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention[i, width - len(r):] = 1
        greedy = temperature <= 0
        gen = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
            do_sample=not greedy, temperature=None if greedy else temperature,
            top_p=None if greedy else top_p, top_k=None if greedy else 0,
            eos_token_id=stops, pad_token_id=pad_id,
            output_scores=logprobs, return_dict_in_generate=True,
        )
        new_BT = gen.sequences[:, width:]
        tok_logp_BT = None
        if logprobs:
            # scores are the processed logits the sampler drew from (temperature, top-p applied)
            logp_BT = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in gen.scores], dim=1)
            tok_logp_BT = logp_BT.gather(-1, new_BT[:, :, None]).squeeze(-1)
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
