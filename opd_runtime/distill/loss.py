"""Per-token reverse-KL advantages and the policy-gradient losses of the OPD learner.

Shapes: B sequences by T positions. ``mask_BT`` is 1 on completion tokens (the only tokens that carry an
advantage or a loss) and 0 on prompt and padding positions. Log-probs at position t are the log-prob of
token t given tokens < t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def per_token_reverse_kl(
    student_logprobs_BT: torch.Tensor, teacher_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Single-sample estimate of reverse KL at each sampled token: log p_student - log p_teacher."""
    return (student_logprobs_BT - teacher_logprobs_BT) * mask_BT


def advantages(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_coef: float = 1.0,
    discount: float = 0.0,
    log_ratio_clip: float | None = None,
) -> torch.Tensor:
    """advantage_t = sum_{k >= t} discount^(k-t) * -kl_coef * (student_lp_k - teacher_lp_k), over completion tokens.

    With the default ``discount=0`` each token's advantage is its own negative reverse-KL term, the
    on-policy distillation objective. A discount > 0 also credits a token with the KL of the tokens it
    leads to (future tokens only: prompt and padding positions contribute nothing).

    ``log_ratio_clip`` c clips each token's log-ratio to [-c, c] first (off by default): a teacher that
    rules a token out gives it a log-ratio of tens of nats, and a few such tokens then set the whole step.
    """
    log_ratio_BT = per_token_reverse_kl(student_logprobs_BT, teacher_logprobs_BT, mask_BT)
    if log_ratio_clip is not None:
        log_ratio_BT = log_ratio_BT.clamp(-log_ratio_clip, log_ratio_clip)
    rewards_BT = -kl_coef * log_ratio_BT
    if discount == 0.0:
        return rewards_BT
    out_BT = torch.zeros_like(rewards_BT)
    running_B = torch.zeros_like(rewards_BT[:, 0])
    for t in range(rewards_BT.shape[1] - 1, -1, -1):
        running_B = rewards_BT[:, t] + discount * running_B
        out_BT[:, t] = running_B * mask_BT[:, t]
    return out_BT


def importance_sampling_loss(
    new_logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    normalizer: float,
    ratio_cap: float | None = None,
) -> torch.Tensor:
    """-sum(ratio * advantage) / normalizer with ratio = p_new / p_sampler, over completion tokens.

    The advantage and the sampler's log-probs are constants; the gradient is advantage * ratio * grad log p.
    ``normalizer`` is the number of completion tokens in the whole optimizer step, so micro-batching
    (gradient accumulation) does not change the loss.

    ``ratio_cap`` C (truncated importance sampling): each token's weight becomes min(ratio, C), taken as a
    constant, so a token's value is min(ratio, C) * advantage and its gradient min(ratio, C) * advantage *
    grad log p. Below the cap both equal the uncapped loss's exactly. The weight is detached rather than
    clamped inside autograd: a clamp would give every token above the cap a zero gradient (PPO's clip),
    dropping the tokens where trainer and sampler disagree most although their advantage is still valid;
    the truncated weight keeps their direction and bounds only its size (bias for bounded variance).
    In OPD each batch gets one optimizer step, so at the loss the ratio is exactly the trainer-sampler
    mismatch (new weights = the weights that sampled): this is the TIS correction for that mismatch.
    """
    log_ratio_BT = new_logprobs_BT - old_logprobs_BT.detach()
    if ratio_cap is None:
        ratio_BT = torch.exp(log_ratio_BT)
        return -(ratio_BT * advantages_BT.detach() * mask_BT).sum() / normalizer
    weight_BT = torch.exp(log_ratio_BT.detach()).clamp(max=ratio_cap)
    # exp(lp - lp.detach()) is 1 in value with gradient grad lp: the weight scales grad log p, not grad ratio
    score_BT = torch.exp(new_logprobs_BT - new_logprobs_BT.detach())
    return -(weight_BT * score_BT * advantages_BT.detach() * mask_BT).sum() / normalizer


@dataclass
class RatioStats:
    """The importance ratio p_trainer / p_sampler over a set of completion tokens (sums, so that
    micro-batches and processes add up): how far the sampler's log-probs are from the trainer's."""

    ratio_sum: float = 0.0
    ratio_max: float = 0.0
    capped: int = 0  # tokens whose ratio exceeded the cap
    tokens: int = 0

    def add(self, new_logprobs_N: torch.Tensor, old_logprobs_N: torch.Tensor, ratio_cap: float | None) -> None:
        ratio_N = torch.exp(new_logprobs_N.detach().float() - old_logprobs_N.detach().float())
        if ratio_N.numel() == 0:
            return
        self.ratio_sum += float(ratio_N.sum())
        self.ratio_max = max(self.ratio_max, float(ratio_N.max()))
        self.capped += int((ratio_N > ratio_cap).sum()) if ratio_cap is not None else 0
        self.tokens += ratio_N.numel()


def ppo_loss(
    new_logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    normalizer: float,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped surrogate: -sum(min(ratio * A, clip(ratio, 1-clip, 1+clip) * A)) / normalizer."""
    ratio_BT = torch.exp(new_logprobs_BT - old_logprobs_BT.detach())
    adv_BT = advantages_BT.detach()
    surrogate_BT = torch.minimum(ratio_BT * adv_BT, torch.clamp(ratio_BT, 1 - clip, 1 + clip) * adv_BT)
    return -(surrogate_BT * mask_BT).sum() / normalizer


# The teacher's mass outside its top k, 1 - sum(top-k probabilities), is floored here before its log is
# taken: the server's log-probs are float32, so a teacher that puts (almost) all its mass in the top k
# yields a remainder that is rounding noise, and log(0) would make the reverse KL infinite.
TAIL_FLOOR = 1e-6


@dataclass
class TopKLogprobs:
    """The teacher's k most likely next tokens at each position of a padded batch: the sparse stand-in for
    its full (B, T, V) log-probs, as a served teacher returns them (``prompt_logprobs``).

    Position t holds the distribution over token t+1 given tokens <= t, as in the dense tensor. Entries
    with ``valid_BTK`` False are padding (positions differ in how many tokens they list); their ids and
    log-probs are placeholders. The ids of one position are distinct.
    """

    ids_BTK: torch.Tensor  # long
    logprobs_BTK: torch.Tensor  # float
    valid_BTK: torch.Tensor  # bool


def _coarsened(
    student_logp_NV: torch.Tensor, ids_NK: torch.Tensor, teacher_lp_NK: torch.Tensor, valid_NK: torch.Tensor
):
    """Student and teacher distributions over {the teacher's listed tokens} + one "any other token" outcome.

    From the student's full log-probs at N positions and the teacher's top-k there, returns (student
    log-probs of the listed tokens, teacher log-probs of them, validity, whether any token is left over,
    student log-prob of the rest, teacher probability of the rest), with every value finite so that no
    -inf * 0 makes a NaN (in the loss or its gradient).
    """
    ids_NK, valid_NK = ids_NK.to(student_logp_NV.device), valid_NK.to(student_logp_NV.device)
    s_top_NK = student_logp_NV.gather(-1, ids_NK)
    t_top_NK = torch.where(valid_NK, teacher_lp_NK.to(student_logp_NV.device).float(), 0.0)
    # the student's mass on everything else, computed from its log-probs (exact, unlike 1 - sum p)
    # amax: an id listed both as a valid entry and as a padding placeholder stays listed
    listed_NV = torch.zeros_like(student_logp_NV).scatter_reduce(-1, ids_NK, valid_NK.float(), reduce="amax") > 0
    rest_empty_N = listed_NV.all(-1)
    s_rest_N = torch.where(rest_empty_N, 0.0, torch.logsumexp(student_logp_NV.masked_fill(listed_NV, -1e30), dim=-1))
    t_mass_N = (t_top_NK.double().exp() * valid_NK).sum(-1)
    t_rest_N = torch.where(rest_empty_N, 0.0, (1.0 - t_mass_N).clamp(min=0.0).float())
    return s_top_NK, t_top_NK, valid_NK.float(), (~rest_empty_N).float(), s_rest_N, t_rest_N


def dense_kl_per_token(student_logp_NV: torch.Tensor, teacher_logp_NV: torch.Tensor, kind: str) -> torch.Tensor:
    """KL between two full next-token distributions at each of N positions (N,).

    ``reverse``: KL(student || teacher) = sum_v p_s (log p_s - log p_t); ``forward``: KL(teacher || student).
    """
    if kind == "reverse":
        return (student_logp_NV.exp() * (student_logp_NV - teacher_logp_NV)).sum(-1)
    return (teacher_logp_NV.exp() * (teacher_logp_NV - student_logp_NV)).sum(-1)


def topk_kl_per_token(
    student_logp_NV: torch.Tensor, ids_NK: torch.Tensor, teacher_lp_NK: torch.Tensor, valid_NK: torch.Tensor, kind: str
) -> torch.Tensor:
    """The same KL with a served teacher's top-k: over the listed tokens plus one "any other token" outcome."""
    s_top, t_top, valid, has_rest, s_rest, t_rest = _coarsened(student_logp_NV, ids_NK, teacher_lp_NK, valid_NK)
    if kind == "reverse":
        kl_N = (valid * s_top.exp() * (s_top - t_top)).sum(-1)
        return kl_N + has_rest * s_rest.exp() * (s_rest - torch.log(t_rest.clamp(min=TAIL_FLOOR)))
    kl_N = (valid * t_top.exp() * (t_top - s_top)).sum(-1)
    return kl_N + torch.special.xlogy(t_rest, t_rest) - t_rest * s_rest


def _dense_reference_kl(
    student_logits_BTV: torch.Tensor,
    teacher: torch.Tensor | TopKLogprobs,
    mask_BT: torch.Tensor,
    normalizer: float,
    kind: str,
) -> torch.Tensor:
    logp_s_BTV = torch.log_softmax(student_logits_BTV[:, :-1].float(), dim=-1)
    if isinstance(teacher, TopKLogprobs):
        kl_BT = topk_kl_per_token(
            logp_s_BTV, teacher.ids_BTK[:, :-1], teacher.logprobs_BTK[:, :-1], teacher.valid_BTK[:, :-1], kind
        )
    else:
        kl_BT = dense_kl_per_token(logp_s_BTV, teacher[:, :-1].float().to(logp_s_BTV.device), kind)
    return (torch.nn.functional.pad(kl_BT, (1, 0)) * mask_BT).sum() / normalizer


def full_reverse_kl_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logprobs_BTV: torch.Tensor | TopKLogprobs,
    mask_BT: torch.Tensor,
    normalizer: float,
) -> torch.Tensor:
    """Exact reverse KL over the whole vocabulary at every sampled position, differentiated through the student.

    sum_t sum_v p_s(v | x_<t) (log p_s(v | x_<t) - log p_t(v | x_<t)) / normalizer. The contexts are the
    student's own samples (on-policy); each position's KL is computed exactly instead of estimated from
    the one token sampled there, which removes the estimator's variance. With a dense teacher (a local
    model) the sum runs over the whole vocabulary; with a served teacher's ``TopKLogprobs`` it runs over
    the listed tokens plus one "any other token" outcome (see ``_coarsened``).

    This is the dense reference (full (B, T, V) logits in fp32): small models and tests only. The learner
    computes the same per-token values chunk by chunk from hidden states (``training.chunked``).
    """
    return _dense_reference_kl(student_logits_BTV, teacher_logprobs_BTV, mask_BT, normalizer, "reverse")


def full_forward_kl_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logprobs_BTV: torch.Tensor | TopKLogprobs,
    mask_BT: torch.Tensor,
    normalizer: float,
) -> torch.Tensor:
    """Forward KL(teacher || student) over the whole vocabulary at every position the student sampled.

    The generalized-KD variant (on-policy contexts, teacher-weighted targets): unlike reverse KL its
    gradient pulls the student toward the teacher's choice even where the student gives it almost no mass.
    With a served teacher's ``TopKLogprobs``: over the listed tokens plus one "any other token" outcome.
    Dense reference, like ``full_reverse_kl_loss``.
    """
    return _dense_reference_kl(student_logits_BTV, teacher_logprobs_BTV, mask_BT, normalizer, "forward")


def masked_entropy_sum(logits_BTV: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sum over completion positions of the entropy of the distribution that predicted each token.

    Dense reference on (B, T, V) logits; the learner takes the entropy per chunk (``training.chunked``)."""
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    ent_BT = -(logp.exp() * logp).sum(-1)
    return (torch.nn.functional.pad(ent_BT, (1, 0)) * mask_BT).sum()
