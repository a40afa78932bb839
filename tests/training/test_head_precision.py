"""The chunked loss head of a full fine-tune under bf16 mixed precision (``training.chunked`` with
``training.precision``): its matrix multiplies run in bf16 like the rest of the model, the log-softmax and
everything after it in float32, and the result is the float32 head's within what bf16 rounding allows.

The head's float32 master weight gets its gradient written straight into ``.grad`` (``_HeadIntoGrad``),
outside autocast, so these tests look at the dtypes the matrix multiplies actually receive (a dispatch
mode sees every aten op, forward, recompute and backward) rather than at the module's settings.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_runtime.training import chunked
from opd_runtime.training.precision import Precision, attach

MIXED_BF16 = Precision(master=torch.float32, frozen=torch.bfloat16, compute=torch.bfloat16, export=torch.bfloat16)
CPU = torch.device("cpu")
N, D, V, CHUNK = 300, 128, 4096, 128
# bf16 keeps 8 significant bits: rounding a value moves it by at most U = 2^-8 of itself
U = 2.0**-8
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class MatmulDtypes(TorchDispatchMode):
    """The input dtypes of every matrix multiply with a vocabulary-sized operand, and of every log-softmax."""

    def __init__(self):
        super().__init__()
        self.head_matmuls: list[tuple[torch.dtype, ...]] = []
        self.log_softmax: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(V in t.shape for t in tensors):
                self.head_matmuls.append(tuple(t.dtype for t in tensors))
        if func is torch.ops.aten._log_softmax.default:
            self.log_softmax.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def full_fine_tune(precision: Precision | None):
    """A one-layer Qwen3 with float32 (master) weights and an untied head, under ``precision``."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():  # logits of a few units, as a trained model's
        model.lm_head.weight.normal_(0, 0.5)
    return model if precision is None else attach(model, precision, CPU)


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(1)
    hidden_ND = torch.randn(N, D, generator=gen)  # the final norm's output: fp32 in a full fine-tune
    targets_N = torch.randint(0, V, (N,), generator=gen)
    cotangent_N = torch.randn(N, generator=gen)  # weighs each position's log-prob, as a loss does
    return hidden_ND, targets_N, cotangent_N


def run_head(model, hidden_ND, targets_N, cotangent_N):
    head = chunked.output_head(model)
    head.weight.grad = None
    hidden = hidden_ND.clone().requires_grad_(True)
    terms = chunked.token_terms(hidden, head, targets_N, entropy=True, chunk_tokens=CHUNK)
    (terms.logprobs_N * cotangent_N).sum().backward()
    return terms.logprobs_N.detach(), hidden.grad, head.weight.grad


def test_the_full_fine_tuning_head_multiplies_in_bf16_and_normalises_in_float32(problem):
    model = full_fine_tune(MIXED_BF16)
    with MatmulDtypes() as seen:
        logprobs_N, hidden_grad, weight_grad = run_head(model, *problem)
    n_chunks = -(-N // CHUNK)
    # per chunk: the forward, its recompute in backward, and the two products of the backward
    assert len(seen.head_matmuls) == 4 * n_chunks
    assert set(seen.head_matmuls) == {(torch.bfloat16, torch.bfloat16)}, seen.head_matmuls
    assert seen.log_softmax and set(seen.log_softmax) == {torch.float32}
    # the master weight's gradient and everything handed back stay float32
    assert weight_grad.dtype == hidden_grad.dtype == logprobs_N.dtype == torch.float32


def test_the_bf16_head_equals_the_float32_head_within_bf16_rounding(problem):
    hidden_ND = problem[0]
    lp, g_hidden, g_weight = run_head(full_fine_tune(MIXED_BF16), *problem)
    ref_lp, ref_g_hidden, ref_g_weight = run_head(full_fine_tune(None), *problem)
    weight_VD = chunked.output_head(full_fine_tune(None)).weight.detach()
    # Forward bound, per position. Rounding h and w to bf16 moves each product h_i w_ji by at most 2U of
    # itself, so logit j by 2U * sum_i |h_i w_ji|; rounding the logit moves it by U |z_j|; a log-softmax
    # moves by at most twice the largest logit error.
    abs_sum_NV = hidden_ND.abs() @ weight_VD.abs().t()
    logits_NV = hidden_ND @ weight_VD.t()
    bound_N = 2 * (2 * U * abs_sum_NV + U * logits_NV.abs()).amax(-1)
    error_N = (lp - ref_lp).abs()
    assert (error_N <= bound_N).all(), (error_N / bound_N).max()
    assert error_N.max() > 0  # the two really differ: it did compute in bf16
    # Gradients, as a whole: four roundings in sequence (the logits, the cotangent of the logits, the
    # weight, the product), each of relative size U, plus the softmax's share of the logits' error.
    for got, ref in ((g_hidden, ref_g_hidden), (g_weight, ref_g_weight)):
        relative = ((got - ref).norm() / ref.norm()).item()
        assert relative < 4 * U, relative
