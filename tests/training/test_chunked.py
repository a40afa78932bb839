"""Chunked token terms (log-probs, cross-entropy, entropy, full KL) against the dense (B, T, V) computation,
values and gradients; that chunking keeps (tokens x vocabulary) out of what autograd saves; gradient
checkpointing with and without LoRA."""

from __future__ import annotations

import functools

import pytest
import torch

from opd_runtime.distill import loss as L
from opd_runtime.training import activations, chunked
from opd_runtime.training.batches import token_logprobs

from support.numerics import assert_close, sum_rel

N, D, V = 23, 16, 50
# Chunked and dense paths reorder float32 sums of up to D + V terms (a logit is a D-term dot product, a
# log-softmax sums V exponentials); the exponential carries a logit's rounding into every probability and
# gradient, and the logits here reach ~17 (student) and ~30 (the teacher's 2x weights): gain 30.
REL = sum_rel(D + V, gain=30)  # ~4.7e-4; a real mismatch (a lost token, a wrong sign) is O(1)


def dense_terms(hidden_ND, head, targets_N, temperature, teacher_hidden_ND=None, teacher_head=None):
    """The plain computation: full logits, fp32 log-softmax over the vocabulary."""
    logp_NV = torch.log_softmax(head(hidden_ND).float() / temperature, dim=-1)
    out = {
        "logprobs": logp_NV.gather(-1, targets_N[:, None]).squeeze(-1),
        "entropy": -(logp_NV.exp() * logp_NV).sum(-1),
    }
    if teacher_head is not None:
        t_NV = torch.log_softmax(teacher_head(teacher_hidden_ND).float(), dim=-1)
        out["teacher"] = t_NV.gather(-1, targets_N[:, None]).squeeze(-1)
        out["reverse"] = (logp_NV.exp() * (logp_NV - t_NV)).sum(-1)
        out["forward"] = (t_NV.exp() * (t_NV - logp_NV)).sum(-1)
    return out


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(D, V, bias=False)
    teacher_head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=gen))
        teacher_head.weight.copy_(2 * torch.randn(V, D, generator=gen))
        teacher_head.weight.requires_grad_(False)
    hidden = torch.randn(N, D, generator=gen)
    teacher_hidden = torch.randn(N, D, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    weights = torch.randn(N, generator=gen)  # an arbitrary cotangent, so each position's gradient counts
    return head, teacher_head, hidden, teacher_hidden, targets, weights


def grads(loss, params):
    """Gradients by ``backward()`` into ``.grad`` (the chunked head writes its weight's gradient there
    directly, which ``torch.autograd.grad`` would not see), then cleared again."""
    for p in params:
        p.grad = None
    loss.backward()
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_chunked_terms_equal_the_dense_computation(problem, chunk_tokens, temperature, kind):
    head, teacher_head, hidden0, teacher_hidden, targets, w = problem
    hidden = hidden0.clone().requires_grad_(True)
    ref = dense_terms(hidden, head, targets, temperature, teacher_hidden, teacher_head)
    terms = chunked.token_terms(
        hidden,
        head,
        targets,
        temperature=temperature,
        entropy=True,
        kl=kind,
        teacher=chunked.DenseTeacherRows(teacher_hidden, teacher_head),
        chunk_tokens=chunk_tokens,
    )
    why = "float32 sums of D + V terms, logits up to 30"
    assert_close(terms.logprobs_N, ref["logprobs"], rel=REL, why=why, what="log-probs")
    assert_close(terms.entropy_N, ref["entropy"], rel=REL, why=why, what="entropy")
    assert_close(terms.teacher_logprobs_N, ref["teacher"], rel=REL, why=why, what="teacher log-probs")
    assert_close(terms.kl_N, ref[kind], rel=REL, why=why, what=f"{kind} KL")
    assert not terms.entropy_N.requires_grad and not terms.teacher_logprobs_N.requires_grad
    params = [hidden, head.weight]
    g_ref = grads((w * ref["logprobs"]).sum() + (w.flip(0) * ref[kind]).sum(), params)
    g = grads((w * terms.logprobs_N).sum() + (w.flip(0) * terms.kl_N).sum(), params)
    for a, b, name in zip(g, g_ref, ("hidden", "head")):
        assert b.abs().max() > 1e-3
        assert_close(a, b, rel=REL, why="float32 sums of D + V terms, logits up to 30", what=f"{name} gradient")


@pytest.mark.cpu_kernels
def test_cross_entropy_and_logprobs_wrappers(problem):
    head, _, hidden0, _, targets, _ = problem
    hidden = hidden0.clone().requires_grad_(True)
    ref = -torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    why = "float32 sums of D + V terms, logits up to 17"
    assert_close(chunked.token_logprobs(hidden, head, targets, chunk_tokens=5), ref, rel=REL, why=why)
    ce = chunked.cross_entropy_sum(hidden, head, targets, chunk_tokens=5)
    # a sum of N non-negative terms: the relative error of the terms, plus N more roundings
    assert_close(ce.item(), -ref.sum().item(), rel=REL + sum_rel(N), why=why + ", then N terms", what="sum")
    (g,) = grads(ce, [head.weight])
    (g_ref,) = grads(-ref.sum(), [head.weight])
    assert_close(g, g_ref, rel=REL, why=why, what="head gradient")


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("kind", ["reverse", "forward"])
@pytest.mark.parametrize("k", [1, 5, V])
def test_chunked_top_k_kl_equals_the_dense_reference_loss(problem, kind, k):
    """The served teacher's top-k, per chunk, against ``full_*_kl_loss`` on (B, T, V) logits."""
    head, teacher_head, hidden0, teacher_hidden, targets, _ = problem
    hidden = hidden0.clone().requires_grad_(True)
    with torch.no_grad():
        teacher_lp_NV = torch.log_softmax(teacher_head(teacher_hidden), dim=-1)
    vals_NK, ids_NK = teacher_lp_NV.topk(k, dim=-1)
    valid_NK = torch.ones_like(ids_NK, dtype=torch.bool)
    valid_NK[3, k // 2 :] = False  # a position listing fewer tokens
    terms = chunked.token_terms(
        hidden, head, targets, kl=kind, chunk_tokens=4, teacher=chunked.TopKRows(ids_NK, vals_NK, valid_NK)
    )
    # the dense reference sees a batch of one row; position t of it predicts token t+1, so shift by one
    logits_BTV = torch.nn.functional.pad(head(hidden), (0, 0, 0, 1))[None]
    top = L.TopKLogprobs(
        torch.nn.functional.pad(ids_NK, (0, 0, 0, 1))[None],
        torch.nn.functional.pad(vals_NK, (0, 0, 0, 1))[None],
        torch.nn.functional.pad(valid_NK, (0, 0, 0, 1))[None],
    )
    mask_BT = torch.nn.functional.pad(torch.ones(N), (1, 0))[None]
    fn = L.full_reverse_kl_loss if kind == "reverse" else L.full_forward_kl_loss
    ref = fn(logits_BTV, top, mask_BT, 3.0)
    # the KL terms are >= 0 (a top-k KL is one over k + 1 outcomes), so their sum holds their relative error
    why = "float32 sums of D + V terms, logits up to 17, then N terms"
    assert_close((terms.kl_N.sum() / 3.0).item(), ref.item(), rel=REL + sum_rel(N), why=why, what="loss")
    (g,) = grads(terms.kl_N.sum() / 3.0, [hidden])
    (g_ref,) = grads(ref, [hidden])
    assert_close(g, g_ref, rel=REL, why=why, what="hidden gradient")


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (what a step keeps alive)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_chunking_saves_no_tokens_by_vocabulary_tensor_for_backward():
    gen = torch.Generator().manual_seed(0)
    big_v, d = 4096, 8
    head = torch.nn.Linear(d, big_v, bias=False)
    for n in (256, 1024):
        hidden = torch.randn(n, d, generator=gen, requires_grad=True)
        targets = torch.randint(0, big_v, (n,), generator=gen)
        dense = saved_bytes(functools.partial(dense_terms, hidden, head, targets, 1.0))
        kept = saved_bytes(functools.partial(chunked.token_terms, hidden, head, targets, entropy=True, chunk_tokens=64))
        assert dense >= n * big_v * 4  # the dense path keeps at least one fp32 (tokens x vocabulary) tensor
        # chunked: each chunk's inputs (hidden rows and targets) and the head's weight, no logits
        assert kept <= n * (d * 4 + 8) + 4 * head.weight.numel() + 4096, (n, kept)


def test_chunked_peak_logits_memory_is_one_chunk():
    """No operation of forward, recompute or backward produces a tensor larger than one chunk's logits,
    whatever the token count: a dispatch mode sees every op's outputs, including the checkpointed
    chunks' recomputation in backward (saved-tensor hooks would not: checkpoint saves only its inputs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    gen = torch.Generator().manual_seed(0)
    big_v, d, chunk = 8192, 8, 32
    head = torch.nn.Linear(d, big_v, bias=False)
    peaks = []
    for n in (128, 1024):
        hidden = torch.randn(n, d, generator=gen, requires_grad=True)
        targets = torch.randint(0, big_v, (n,), generator=gen)
        with LargestOutput() as seen:
            chunked.cross_entropy_sum(hidden, head, targets, chunk_tokens=chunk).backward()
        peaks.append(seen.numel)
    assert peaks[0] == peaks[1] == chunk * big_v, peaks
    # the same mode does see full logits when they are made (the check can fail)
    with LargestOutput() as seen:
        torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum").backward()
    assert seen.numel == 1024 * big_v


# --- on a real (tiny) Qwen3: hidden states, tied head, LoRA, gradient checkpointing -----------------


# A tiny Qwen3's longest float32 reductions: the tied head's 97-token softmax and the MLP's 64-wide
# down-projection; its random-init logits stay below ~5. Two paths through it (chunked or not, checkpointed
# or not) reorder those sums at most.
QWEN_REL = sum_rel(97 + 64, gain=5)  # ~1.9e-4


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        head_dim=16,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg)


@pytest.mark.cpu_kernels
def test_sequence_logprobs_equal_the_logits_path_with_a_tied_head():
    model = tiny_qwen3()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one parameter
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    lp = chunked.sequence_logprobs(model, ids, temperature=0.8, chunk_tokens=4)
    g = grads(lp.sum(), list(model.parameters()))
    ref = token_logprobs(model(input_ids=ids).logits, ids, temperature=0.8)
    g_ref = grads(ref.sum(), list(model.parameters()))
    why = "float32 sums of 97 + 64 terms, logits below 5"
    assert_close(lp, ref, rel=QWEN_REL, why=why, what="log-probs")
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref):
        assert_close(a, b, rel=QWEN_REL, why=why, what=f"{name} gradient")


def lora(model, targets):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():  # LoRA starts with B = 0; make the adapters do something
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return peft


def step_grads(model, ids, mask, chunk_tokens=5):
    model.zero_grad(set_to_none=True)
    sel = chunked.select_predicting(mask)
    hidden = chunked.final_hidden_states(model, ids)
    loss = chunked.cross_entropy_sum(
        hidden[:, :-1][sel], chunked.output_head(model), ids[:, 1:][sel], chunk_tokens=chunk_tokens
    )
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("targets", [["q_proj", "down_proj"], ["q_proj", "down_proj", "lm_head"]])
def test_gradient_checkpointing_with_lora_gives_every_adapter_its_gradient(targets):
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 13)
    mask[:, :4] = 0
    plain = lora(tiny_qwen3(), targets).train()
    checkpointed = lora(tiny_qwen3(), targets).train()
    checkpointed.load_state_dict(plain.state_dict())
    activations.use_gradient_checkpointing(checkpointed, True)
    assert checkpointed.get_base_model().is_gradient_checkpointing
    loss_a, g_a = step_grads(plain, ids, mask)
    loss_b, g_b = step_grads(checkpointed, ids, mask)
    why = "recomputation reorders nothing, but a kernel may pick another blocking for another call"
    assert_close(loss_a, loss_b, rel=QWEN_REL, why=why, what="loss")
    assert g_a.keys() == g_b.keys() and g_a
    assert any("lm_head" in n for n in g_a) == ("lm_head" in targets)
    for n, g in g_b.items():
        assert g is not None, f"{n} got no gradient under gradient checkpointing"
        assert g.abs().max() > 0, f"{n}: zero gradient"
        assert_close(g, g_a[n], rel=QWEN_REL, why=why, what=f"{n}: differs from the non-checkpointed gradient")


def test_gradient_checkpointing_recomputes_the_layers_in_backward():
    """The switch really changes what runs: each decoder layer's forward runs again in backward."""
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    counts = {}
    for enabled in (False, True):
        model = tiny_qwen3().train()
        activations.use_gradient_checkpointing(model, enabled)
        calls: list[int] = []
        # a pre-hook: the recompute stops early once the last tensor backward needs is back (inside the mlp)
        model.model.layers[0].self_attn.register_forward_pre_hook(
            functools.partial(lambda seen, *_: seen.append(1), calls)
        )
        step_grads(model, ids, torch.ones(1, 9))
        counts[enabled] = len(calls)
    assert counts == {False: 1, True: 2}
    model = tiny_qwen3()
    activations.use_gradient_checkpointing(model, True)
    activations.use_gradient_checkpointing(model, False)
    assert not model.is_gradient_checkpointing
