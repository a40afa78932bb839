"""Token-level quantities from a causal LM's final hidden states, a chunk of tokens at a time.

A (tokens x vocabulary) fp32 tensor is what makes long sequences run out of memory: 32k tokens x 151,936
ids is ~20 GB per copy, and a log-softmax with its backward keeps several copies. Here the model body
runs once to its final hidden states (tokens x hidden), only the positions that carry a loss are kept,
and the output head is applied to ``chunk_tokens`` of them at a time. Each chunk runs under
``torch.utils.checkpoint``: its logits are freed as soon as the chunk's per-token values are out and
recomputed in backward, so the peak logits memory is ``chunk_tokens x vocabulary`` whatever the length.
(A plain chunk loop would not help: autograd would keep every chunk's log-softmax for backward.)

Everything a step needs comes out of one pass over the chunks (``token_terms``): the log-prob of each
target token at a temperature, the entropy metric, the full-vocabulary KL against a teacher (dense: the
teacher's own hidden states and head, applied per chunk in the same loop; or the top-k lists a served
teacher returns), and the dense teacher's log-prob of each target token.

Shapes: B rows x T positions; N selected positions (flattened); D hidden size; V vocabulary; K top-k.
Position t's hidden state predicts token t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from ..distill import loss as L
from . import attention
from .precision import head_compute_dtype

# Tokens per chunk. 512 x 151,936 fp32 logits are ~300 MB per copy (a chunk's forward and backward hold a
# few); large enough that the head's matrix multiply runs at full speed on a GPU.
CHUNK_TOKENS = 512


def base_model(model):
    """The Hugging Face model under a PEFT wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model) -> torch.nn.Module:
    """The module that maps final hidden states to logits: ``lm_head``, tied to the input embeddings or
    not, and wrapped by LoRA when LoRA targets it (calling the module applies the adapter too)."""
    base = base_model(model)
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0):
        # the head's output would need the model's own post-processing, which this module does not replicate
        raise NotImplementedError(f"{type(base).__name__}: scaled or soft-capped logits are not supported")
    return base.get_output_embeddings()


def final_hidden_states(
    model, input_ids_BT: torch.Tensor, *, position_ids_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """The decoder's output after its final norm (B, T, D), without computing any logits.

    The model is called through its top-level forward (so wrappers' hooks run: PEFT, FSDP's all-gather)
    with ``logits_to_keep`` an empty index, which makes the head compute logits for no position, and the
    hidden states are taken from the decoder's output by a forward hook. No attention mask is passed:
    right-padded rows need none under a causal mask (real tokens never look right, at the padding), and
    packed rows are told apart by their restarted ``position_ids`` (``sdpa_varlen`` splits the rows there;
    transformers' sdpa/eager build a block-diagonal mask). ``use_cache=False``: with a cache,
    transformers ignores the packing and the traces would attend to each other.

    Under ``sdpa_varlen`` the traces of each row are found here, once, on the host (pass the position ids
    in host memory, as the packer makes them, and nothing waits for the device) and handed to every layer.
    """
    base = base_model(model)
    extra = {}
    if getattr(base.config, "_attn_implementation", None) == attention.NAME:
        B, T = input_ids_BT.shape
        rows = ((0, T),) * B if position_ids_BT is None else attention.row_trace_starts(position_ids_BT)
        extra[attention.TRACE_STARTS] = rows
    if position_ids_BT is not None:
        position_ids_BT = position_ids_BT.to(input_ids_BT.device)
    decoder = base.get_decoder()
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(grab)
    try:
        model(
            input_ids=input_ids_BT,
            position_ids=position_ids_BT,
            use_cache=False,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids_BT.device),
            **extra,
        )
    finally:
        handle.remove()
    (hidden_BTD,) = captured
    return hidden_BTD


def select_predicting(mask_BT: torch.Tensor) -> torch.Tensor:
    """Which positions of ``hidden_BTD[:, :-1]`` predict a token that carries a loss: (B, T-1) bool.

    ``mask_BT`` marks loss-carrying tokens (1 at token t); the hidden state at t - 1 predicts token t.
    """
    return mask_BT[:, 1:].bool()


@dataclass
class DenseTeacherRows:
    """A local teacher's final hidden states at the selected positions, with its output head: its
    full next-token distributions, computed one chunk at a time inside ``token_terms``."""

    hidden_ND: torch.Tensor
    head: torch.nn.Module


@dataclass
class TopKRows:
    """A served teacher's top-k next-token log-probs at the selected positions (see ``TopKLogprobs``)."""

    ids_NK: torch.Tensor
    logprobs_NK: torch.Tensor
    valid_NK: torch.Tensor


TeacherRows = DenseTeacherRows | TopKRows
KlKind = Literal["reverse", "forward"]


@dataclass
class TokenTerms:
    """Per selected position (N,). ``logprobs_N`` and ``kl_N`` carry gradients to the student."""

    logprobs_N: torch.Tensor  # student log p(target) at the temperature
    entropy_N: torch.Tensor | None = None  # detached: a metric
    kl_N: torch.Tensor | None = None  # full-vocabulary KL against the teacher, per position
    teacher_logprobs_N: torch.Tensor | None = None  # detached: dense teacher's log p(target), temperature 1


class _HeadIntoGrad(torch.autograd.Function):
    """``hidden_CD @ weight_VD.T`` whose backward adds the weight's gradient straight into ``weight.grad``.

    Through autograd, every chunk's (V x D) weight gradient would wait in the engine's input buffer to be
    summed with the other chunks' (and a tied embedding's) before reaching ``.grad``: about three
    (V x D) fp32 tensors at once, 3.5 GiB for Qwen3's head, whatever the chunk size. Accumulating in
    place keeps it to the one ``.grad``. Used only for a plain, unsharded ``nn.Linear`` head (see
    ``_plain_weight``); LoRA-wrapped or sharded heads go through autograd as usual.

    ``compute_VD``: the weight in the run's compute dtype (bf16 under mixed precision), or None to
    multiply by ``weight_VD`` itself. A custom function runs outside autocast, so the casts are explicit:
    the products (logits, and both of the backward's) take bf16 operands, as autocast would give them,
    and each chunk's weight gradient is added into the float32 master's ``.grad``.
    """

    @staticmethod
    def forward(ctx, hidden_CD: torch.Tensor, weight_VD: torch.Tensor, compute_VD: torch.Tensor | None) -> torch.Tensor:
        operand_VD = weight_VD.detach() if compute_VD is None else compute_VD
        hidden_in_CD = hidden_CD.to(operand_VD.dtype)
        ctx.save_for_backward(hidden_in_CD)
        ctx.weight, ctx.operand, ctx.hidden_dtype = weight_VD, operand_VD, hidden_CD.dtype
        return hidden_in_CD @ operand_VD.t()

    @staticmethod
    def backward(ctx, grad_CV: torch.Tensor):
        (hidden_in_CD,) = ctx.saved_tensors
        weight, operand_VD = ctx.weight, ctx.operand
        grad_CV = grad_CV.to(operand_VD.dtype)
        grad_hidden = (grad_CV @ operand_VD).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        if weight.requires_grad:
            with torch.no_grad():
                if weight.grad is None:
                    weight.grad = (grad_CV.t() @ hidden_in_CD).to(weight.dtype)
                elif operand_VD.dtype == weight.grad.dtype:
                    weight.grad.addmm_(grad_CV.t(), hidden_in_CD)
                else:  # a bf16 product (V x D, half the bytes of .grad) added into the fp32 gradient
                    weight.grad.add_(grad_CV.t() @ hidden_in_CD)
        return grad_hidden, None, None


def _plain_weight(head: torch.nn.Module) -> torch.Tensor | None:
    """The head's weight when it is a plain bias-free ``nn.Linear`` on an ordinary parameter (not LoRA-
    wrapped, not a sharded DTensor), so ``_HeadIntoGrad`` may write its gradient; else None."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    return weight if type(weight) is torch.nn.Parameter else None


def _compute_weight(head: torch.nn.Module) -> torch.Tensor | None:
    """The plain head's weight cast once to the run's compute dtype (``precision.attach``), for all the
    chunks of one call (recomputation included); None where no cast is needed or the head is not plain."""
    weight = _plain_weight(head)
    dtype = head_compute_dtype(head)
    if weight is None or dtype is None or weight.dtype == dtype or not torch.is_grad_enabled():
        return None
    return weight.detach().to(dtype)


def _logits(head: torch.nn.Module, hidden_CD: torch.Tensor, compute_VD: torch.Tensor | None) -> torch.Tensor:
    weight = _plain_weight(head)
    if weight is None or not torch.is_grad_enabled():
        return head(hidden_CD)  # the module's own forward: autocast, LoRA, FSDP's all-gather
    return _HeadIntoGrad.apply(hidden_CD, weight, compute_VD)


def _chunk(
    head: torch.nn.Module,
    temperature: float,
    entropy: bool,
    kl: KlKind | None,
    teacher_head: torch.nn.Module | None,
    head_compute_VD: torch.Tensor | None,
    hidden_CD: torch.Tensor,
    targets_C: torch.Tensor,
    *teacher_CX: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The per-token values of one chunk of C positions (the function each checkpoint recomputes)."""
    # whatever dtype the head computed in, the log-softmax and all that follows are float32
    logits_CV = _logits(head, hidden_CD, head_compute_VD).float()
    if temperature != 1.0:
        logits_CV = logits_CV / temperature
    logp_CV = torch.log_softmax(logits_CV, dim=-1)
    del logits_CV
    out = [logp_CV.gather(-1, targets_C[:, None]).squeeze(-1)]
    if entropy:
        with torch.no_grad():
            out.append(-(logp_CV.exp() * logp_CV).sum(-1))
    if teacher_head is not None:
        (teacher_hidden_CD,) = teacher_CX
        with torch.no_grad():
            t_logp_CV = torch.log_softmax(teacher_head(teacher_hidden_CD).float(), dim=-1)
        out.append(t_logp_CV.gather(-1, targets_C[:, None]).squeeze(-1))
        if kl is not None:
            out.append(L.dense_kl_per_token(logp_CV, t_logp_CV, kl))
    elif kl is not None:
        ids_CK, lp_CK, valid_CK = teacher_CX
        out.append(L.topk_kl_per_token(logp_CV, ids_CK, lp_CK, valid_CK, kl))
    return tuple(out)


def token_terms(
    hidden_ND: torch.Tensor,
    head: torch.nn.Module,
    targets_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    kl: KlKind | None = None,
    teacher: TeacherRows | None = None,
    chunk_tokens: int | None = None,
) -> TokenTerms:
    """Student log-probs of ``targets_N`` (and on request entropy, KL against ``teacher``) from hidden states.

    The student's distribution is softmax(head(h) / temperature); the teacher's is taken at temperature 1
    (as a served teacher returns it). With a ``DenseTeacherRows`` teacher the teacher's log-probs of the
    targets come out too. Values are those of the dense computation (fp32 log-softmax over the whole
    vocabulary per position); only the memory differs. The head's matrix multiply runs in the run's
    compute dtype (bf16 under mixed precision, ``precision.attach``): a plain head's weight is cast once
    per call and the cast kept until backward (V x D bf16, 0.6 GiB for Qwen3-1.7B).

    ``chunk_tokens`` (default): ``CHUNK_TOKENS``, halved with a dense teacher, whose logits and log-probs
    are a second (chunk x vocabulary) set beside the student's; so a chunk holds about as much as a
    student-only chunk (measured at Qwen3's vocabulary, forward-KL chunk peak: 1.66 GiB at 512 tokens,
    1.10 GiB at 256; the student's cross-entropy alone: 1.07 GiB at 512).
    """
    if kl is not None and teacher is None:
        raise ValueError("a KL needs the teacher's distributions")
    teacher_head: torch.nn.Module | None = None
    teacher_ND: tuple[torch.Tensor, ...] = ()
    if isinstance(teacher, DenseTeacherRows):
        teacher_head = teacher.head
        teacher_ND = (teacher.hidden_ND,)
    elif isinstance(teacher, TopKRows) and kl is not None:
        teacher_ND = (teacher.ids_NK, teacher.logprobs_NK, teacher.valid_NK)
    dense = teacher_head is not None
    if chunk_tokens is None:
        chunk_tokens = CHUNK_TOKENS // 2 if dense else CHUNK_TOKENS
    N = hidden_ND.shape[0]
    n_out = 1 + int(entropy) + int(dense) + int(kl is not None)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(n_out)]
    # checkpoint only where something will be differentiated (the hidden states, or LoRA on the head)
    recompute = torch.is_grad_enabled() and (hidden_ND.requires_grad or any(p.requires_grad for p in head.parameters()))
    head_compute_VD = _compute_weight(head)
    for start in range(0, N, chunk_tokens):
        end = min(N, start + chunk_tokens)
        args = (
            head,
            temperature,
            entropy,
            kl,
            teacher_head,
            head_compute_VD,
            hidden_ND[start:end],
            targets_N[start:end],
            *(t[start:end] for t in teacher_ND),
        )
        # checkpoint: keep only this chunk's inputs for backward, recompute its logits there
        outs = checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args)
        for acc, o in zip(pieces, outs):
            acc.append(o)
    if N == 0:
        empty = hidden_ND.new_zeros(0, dtype=torch.float32)
        cat = [empty for _ in range(n_out)]
    else:
        cat = [torch.cat(p) for p in pieces]
    it = iter(cat)
    terms = TokenTerms(next(it))
    terms.entropy_N = next(it) if entropy else None
    terms.teacher_logprobs_N = next(it) if dense else None
    terms.kl_N = next(it) if kl is not None else None
    return terms


def token_logprobs(
    hidden_ND: torch.Tensor,
    head: torch.nn.Module,
    targets_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """log p(target) at each selected position (N,), differentiable."""
    return token_terms(hidden_ND, head, targets_N, temperature=temperature, chunk_tokens=chunk_tokens).logprobs_N


def cross_entropy_sum(
    hidden_ND: torch.Tensor, head: torch.nn.Module, targets_N: torch.Tensor, *, chunk_tokens: int = CHUNK_TOKENS
) -> torch.Tensor:
    """Summed next-token negative log-likelihood of ``targets_N`` (the SFT loss before normalisation)."""
    return -token_logprobs(hidden_ND, head, targets_N, chunk_tokens=chunk_tokens).sum()


def sequence_logprobs(
    model,
    input_ids_BT: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """(B, T) log-prob of each token given the tokens before it, at the positions ``mask_BT`` marks (all
    but position 0 by default); 0 elsewhere. For right-padded rows (no attention mask is needed)."""
    if mask_BT is None:
        mask_BT = torch.ones_like(input_ids_BT, dtype=torch.float32)
        mask_BT[:, 0] = 0
    sel_BT = select_predicting(mask_BT.to(input_ids_BT.device))
    hidden_BTD = final_hidden_states(model, input_ids_BT)
    lp_N = token_logprobs(
        hidden_BTD[:, :-1][sel_BT],
        output_head(model),
        input_ids_BT[:, 1:][sel_BT],
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    out_BT = torch.zeros(input_ids_BT.shape, dtype=torch.float32, device=input_ids_BT.device)
    out_BT[:, 1:][sel_BT] = lp_N.to(out_BT.dtype)
    return out_BT
