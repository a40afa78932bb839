"""How close two floating-point results must be to count as equal, and why: the one place the tests' rounding
arithmetic lives (docs/development/portability.md says how the tests run under other CPUs' kernels).

Two correct computations of one quantity differ by rounding, and how they round depends on the machine:
PyTorch picks its vectorised kernels by CPU capability (``ATEN_CPU_CAPABILITY``: default, avx2, avx512),
MKL and oneDNN pick theirs by instruction set, and the thread count splits a reduction into other partial
sums. Each change reorders a sum's terms, so a bound tuned on one CPU can fail on the next. A bound that
holds everywhere comes from the arithmetic, relative to the size of what is compared:

- a sum (or dot product) of ``n`` terms rounded in a format with unit roundoff ``eps`` is off by at most
  about ``n * eps * sum|term|``, whatever the order of the terms; two orders differ by at most twice that;
- an exponential (softmax, log-softmax, exp of a log-ratio) turns an absolute error ``e`` of its argument
  into a relative error ``e`` of its result, so logits of size ``L`` carry ``L`` times their relative error
  into probabilities and gradients.

``assert_close`` compares normwise, ``max|actual - expected| <= rel * max|expected|``: the error of every
element is held to the scale of the whole tensor, since a gradient's near-zero entries carry the rounding of
its largest terms (an element-wise relative bound would fail on them on some CPU, an absolute one on large
tensors). It still catches a real bug: a wrong sign, a missing term or a token counted twice moves some
element by a sizeable fraction of the largest one, orders of magnitude above ``rel``.
"""

from __future__ import annotations

import torch

# Unit roundoff (machine epsilon) per format: float32 has 24 significant bits, bfloat16 8.
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def sum_rel(terms: int, *, dtype: torch.dtype = torch.float32, gain: float = 1.0) -> float:
    """The relative gap two correct orderings of a ``terms``-term sum in ``dtype`` may show (``2 * terms *
    eps``), times ``gain``: how much the computation after the sum magnifies it (the size of the logits an
    exponential is taken of, or a condition number)."""
    return 2.0 * terms * EPS[dtype] * gain


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in float64 (0 when both are all zero)."""
    a, b = actual.detach().double(), expected.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def assert_close(actual, expected, *, rel: float, why: str, what: str = "") -> None:
    """Assert ``max|actual - expected| <= rel * max|expected|`` (tensors or numbers, same shape). ``why``
    says where ``rel`` comes from; it is printed with the measured error when the check fails."""
    a, b = torch.as_tensor(actual), torch.as_tensor(expected)
    assert a.shape == b.shape, f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}"
    err = normwise_error(a, b)
    assert err <= rel, f"{what + ': ' if what else ''}normwise error {err:.3e} > {rel:.1e} ({why})"


# The untrained random models of support.models (hidden 64, MLP 128, a 384-token vocabulary): their longest float32
# sums are the vocabulary's softmax and the MLP's down-projection, and their random-init logits stay below 1
# (no gain). Two correct paths through them (batched or not, packed or padded, chunked or dense) differ by
# at most this, relative to the largest value compared.
TINY_MODEL_REL = sum_rel(384 + 128)  # ~1.2e-4


# Log-probs of the trained tiny world (the teacher's logits reach |20|; its longest dot product is the MLP's
# 384 terms). A log-prob's rounding error is absolute: |logit| times the logits' relative error. Summed in
# another order, 384 float32 terms typically move by about sqrt(384) * eps of their scale (rounding errors
# add like a random walk; the worst case, 384 * eps, is 20x looser and not what kernels show):
# 20 * sqrt(384) * 1.2e-7 ~ 5e-5 nats. vLLM's CPU kernels and PyTorch's were measured ~1e-6 apart on an
# AVX-512 CPU. A real fault (a wrong token, a temperature not applied, weights one step stale) moves
# log-probs by 1e-2 nats or more, far above this.
WORLD_LOGPROB_ATOL = 1e-4


# Weights after a few AdamW steps computed two ways (one process vs several, DDP vs FSDP, resumed vs not),
# compared normwise per tensor. The gradients differ by reduction order (a relative ~1e-6 for the tiny
# models' batches); AdamW divides by sqrt(v), which passes that through where successive gradients agree in
# sign and magnifies it where the first moment nearly cancels. Measured after 3 steps with two processes
# (LoRA SFT / FSDP full fine-tune): 2.3e-7 / 4.4e-6 with AVX-512 kernels, 1.0e-7 / 5.7e-7 with AVX2,
# 2.7e-7 / 3.5e-6 with the plain kernels on one thread. A real fault (a rank's batch dropped or counted
# twice, a shard not synced) moves some weight by about the learning rate per step, ~1e-3 of the
# largest weight here.
ADAMW_WEIGHTS_REL = 1e-5
