"""The ``hf`` sampler (``generation.sample``) gathers each chosen token's log-prob as it decodes instead of
keeping every step's full-vocabulary scores; it must sample exactly what Hugging Face ``generate`` samples
with its own warpers and report the log-probs ``output_scores`` gave (the way it worked before).
"""

from __future__ import annotations

import pytest
import torch

from opd_runtime import modeling, tinymath
from opd_runtime.generation import sample, stop_token_ids
from opd_runtime.training.batches import prompt_ids

from support.numerics import TINY_MODEL_REL, assert_close

# the hf sampler and generate (or one batch and several) run the same tiny model's float32 sums, perhaps
# blocked otherwise; a token's log-prob taken at the wrong position or temperature is off by O(1)
WHY = "the tiny models' float32 sums in another order"


def reference_sample(model, tokenizer, prompts, *, n, temperature, top_p, max_new_tokens):
    """The previous implementation: generate's own warpers, every step's scores kept (output_scores)."""
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    rows = [list(p) for p in prompts for _ in range(n)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention[i, width - len(r) :] = 1
    greedy = temperature <= 0
    model.eval()
    with torch.no_grad():
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None if greedy else 0,
            eos_token_id=stops,
            pad_token_id=pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new_BT = gen.sequences[:, width:]
    logp_BTV = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in gen.scores], dim=1)
    lp_BT = logp_BTV.gather(-1, new_BT[:, :, None]).squeeze(-1)
    out = []
    for i in range(len(rows)):
        ids = new_BT[i].tolist()
        end = next((t + 1 for t, tok in enumerate(ids) if tok in stops), None) or len(ids)
        out.append((ids[:end], lp_BT[i, :end]))
    return out


@pytest.mark.cpu_kernels
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_hf_sampler_matches_generate_with_output_scores(random_models, temperature, top_p):
    tok = modeling.load_tokenizer(str(random_models.student))
    model = modeling.load_causal_lm(str(random_models.student), dtype="float32")
    problems = tinymath.generate(6, split="test", seed=0, difficulty=2)
    prompts = [prompt_ids(tok, tinymath.chat_messages(p.problem)) for p in problems]
    torch.manual_seed(3)
    ref = reference_sample(model, tok, prompts, n=2, temperature=temperature, top_p=top_p, max_new_tokens=24)
    torch.manual_seed(3)
    got = sample(model, tok, prompts, n=2, temperature=temperature, top_p=top_p, max_new_tokens=24, batch_size=64)
    assert len(got) == len(ref) == 12
    for s, (ids, lp) in zip(got, ref):
        assert s.completion_ids == ids  # same tokens: the warpers ran in the same order on the same RNG
        assert len(s.logprobs) == len(ids)
        assert_close(torch.tensor(s.logprobs), lp, rel=TINY_MODEL_REL, why=WHY, what=f"{s.logprobs} vs {lp}")
    if temperature == 0.7:
        # the recorded log-probs are those of the warped distribution, not the raw one
        assert any(lp < -1e-3 for s in got for lp in s.logprobs)
        assert max(len(s.completion_ids) for s in got) > 1


@pytest.mark.cpu_kernels
def test_hf_sampler_log_probs_split_over_batches_equal_one_batch(random_models):
    tok = modeling.load_tokenizer(str(random_models.student))
    model = modeling.load_causal_lm(str(random_models.student), dtype="float32")
    problems = tinymath.generate(4, split="test", seed=1, difficulty=2)
    prompts = [prompt_ids(tok, tinymath.chat_messages(p.problem)) for p in problems]
    # greedy: the same tokens whatever the batching; the log-probs agree within float rounding
    whole = sample(model, tok, prompts, temperature=0.0, max_new_tokens=16, batch_size=8)
    split = sample(model, tok, prompts, temperature=0.0, max_new_tokens=16, batch_size=1)
    assert [s.completion_ids for s in whole] == [s.completion_ids for s in split]
    for a, b in zip(whole, split):
        assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rel=TINY_MODEL_REL, why=WHY)
