"""Per-token reverse-KL advantages and the policy-gradient losses of the OPD learner.

Shapes: B sequences by T positions. ``mask_BT`` is 1 on completion tokens (the only tokens that carry an
advantage or a loss) and 0 on prompt and padding positions. Log-probs at position t are the log-prob of
token t given tokens < t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def per_token_reverse_kl(student_logprobs_BT: torch.Tensor, teacher_logprobs_BT: torch.Tensor,
                         mask_BT: torch.Tensor) -> torch.Tensor:
    """Single-sample estimate of reverse KL at each sampled token: log p_student - log p_teacher."""
    return (student_logprobs_BT - teacher_logprobs_BT) * mask_BT


def advantages(student_logprobs_BT: torch.Tensor, teacher_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
               *, kl_coef: float = 1.0, discount: float = 0.0) -> torch.Tensor:
    """advantage_t = sum_{k >= t} discount^(k-t) * -kl_coef * (student_lp_k - teacher_lp_k), over completion tokens.

    With the default ``discount=0`` each token's advantage is its own negative reverse-KL term, the
    on-policy distillation objective. A discount > 0 also credits a token with the KL of the tokens it
    leads to (future tokens only: prompt and padding positions contribute nothing).
    """
    rewards_BT = -kl_coef * per_token_reverse_kl(student_logprobs_BT, teacher_logprobs_BT, mask_BT)
    if discount == 0.0:
        return rewards_BT
    out_BT = torch.zeros_like(rewards_BT)
    running_B = torch.zeros_like(rewards_BT[:, 0])
    for t in range(rewards_BT.shape[1] - 1, -1, -1):
        running_B = rewards_BT[:, t] + discount * running_B
        out_BT[:, t] = running_B * mask_BT[:, t]
    return out_BT


def importance_sampling_loss(new_logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor,
                             advantages_BT: torch.Tensor, mask_BT: torch.Tensor,
                             normalizer: float) -> torch.Tensor:
    """-sum(ratio * advantage) / normalizer with ratio = p_new / p_sampler, over completion tokens.

    The advantage and the sampler's log-probs are constants; the gradient is advantage * ratio * grad log p.
    ``normalizer`` is the number of completion tokens in the whole optimizer step, so micro-batching
    (gradient accumulation) does not change the loss.
    """
    ratio_BT = torch.exp(new_logprobs_BT - old_logprobs_BT.detach())
    return -(ratio_BT * advantages_BT.detach() * mask_BT).sum() / normalizer


def ppo_loss(new_logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, advantages_BT: torch.Tensor,
             mask_BT: torch.Tensor, normalizer: float, clip: float = 0.2) -> torch.Tensor:
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


def _coarsened(student_logits_BTV: torch.Tensor, teacher: TopKLogprobs):
    """Student and teacher distributions over {the teacher's listed tokens} + one "any other token" outcome.

    Returns (student log-probs of the listed tokens, teacher log-probs of them, validity, whether any token
    is left over, student log-prob of the rest, teacher probability of the rest), all for positions :-1,
    with every value finite so that no -inf * 0 makes a NaN (in the loss or its gradient).
    """
    logits_BTV = student_logits_BTV[:, :-1].float()
    ids_BTK, valid_BTK = teacher.ids_BTK[:, :-1].to(logits_BTV.device), teacher.valid_BTK[:, :-1].to(logits_BTV.device)
    lse_BT = torch.logsumexp(logits_BTV, dim=-1)
    s_top_BTK = logits_BTV.gather(-1, ids_BTK) - lse_BT[..., None]
    t_top_BTK = torch.where(valid_BTK, teacher.logprobs_BTK[:, :-1].to(logits_BTV.device).float(), 0.0)
    # the student's mass on everything else, computed from its logits (exact, unlike 1 - sum p)
    listed_BTV = torch.zeros_like(logits_BTV).scatter_reduce(-1, ids_BTK, valid_BTK.float(), reduce="amax") > 0
    rest_empty_BT = listed_BTV.all(-1)
    lse_rest_BT = torch.logsumexp(logits_BTV.masked_fill(listed_BTV, -1e30), dim=-1)
    s_rest_BT = torch.where(rest_empty_BT, 0.0, lse_rest_BT - lse_BT)
    t_mass_BT = (t_top_BTK.double().exp() * valid_BTK).sum(-1)
    t_rest_BT = torch.where(rest_empty_BT, 0.0, (1.0 - t_mass_BT).clamp(min=0.0).float())
    return s_top_BTK, t_top_BTK, valid_BTK.float(), (~rest_empty_BT).float(), s_rest_BT, t_rest_BT


def full_reverse_kl_loss(student_logits_BTV: torch.Tensor, teacher_logprobs_BTV: torch.Tensor | TopKLogprobs,
                         mask_BT: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Exact reverse KL over the whole vocabulary at every sampled position, differentiated through the student.

    sum_t sum_v p_s(v | x_<t) (log p_s(v | x_<t) - log p_t(v | x_<t)) / normalizer. The contexts are the
    student's own samples (on-policy); each position's KL is computed exactly instead of estimated from
    the one token sampled there, which removes the estimator's variance. With a dense teacher (a local
    model) the sum runs over the whole vocabulary; with a served teacher's ``TopKLogprobs`` it runs over
    the listed tokens plus one "any other token" outcome (see ``_coarsened``).
    """
    if isinstance(teacher_logprobs_BTV, TopKLogprobs):
        s_top, t_top, valid, has_rest, s_rest, t_rest = _coarsened(student_logits_BTV, teacher_logprobs_BTV)
        kl_BT = (valid * s_top.exp() * (s_top - t_top)).sum(-1)
        kl_BT = kl_BT + has_rest * s_rest.exp() * (s_rest - torch.log(t_rest.clamp(min=TAIL_FLOOR)))
        return (torch.nn.functional.pad(kl_BT, (1, 0)) * mask_BT).sum() / normalizer
    logp_s = torch.log_softmax(student_logits_BTV[:, :-1].float(), dim=-1)
    kl_BT = (logp_s.exp() * (logp_s - teacher_logprobs_BTV[:, :-1].float())).sum(-1)
    return (torch.nn.functional.pad(kl_BT, (1, 0)) * mask_BT).sum() / normalizer


def full_forward_kl_loss(student_logits_BTV: torch.Tensor, teacher_logprobs_BTV: torch.Tensor | TopKLogprobs,
                         mask_BT: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Forward KL(teacher || student) over the whole vocabulary at every position the student sampled.

    The generalized-KD variant (on-policy contexts, teacher-weighted targets): unlike reverse KL its
    gradient pulls the student toward the teacher's choice even where the student gives it almost no mass.
    With a served teacher's ``TopKLogprobs``: over the listed tokens plus one "any other token" outcome.
    """
    if isinstance(teacher_logprobs_BTV, TopKLogprobs):
        s_top, t_top, valid, _, s_rest, t_rest = _coarsened(student_logits_BTV, teacher_logprobs_BTV)
        kl_BT = (valid * t_top.exp() * (t_top - s_top)).sum(-1)
        kl_BT = kl_BT + torch.special.xlogy(t_rest, t_rest) - t_rest * s_rest
        return (torch.nn.functional.pad(kl_BT, (1, 0)) * mask_BT).sum() / normalizer
    logp_s = torch.log_softmax(student_logits_BTV[:, :-1].float(), dim=-1)
    logp_t = teacher_logprobs_BTV[:, :-1].float()
    kl_BT = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    return (torch.nn.functional.pad(kl_BT, (1, 0)) * mask_BT).sum() / normalizer


def masked_entropy_sum(logits_BTV: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sum over completion positions of the entropy of the distribution that predicted each token."""
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    ent_BT = -(logp.exp() * logp).sum(-1)
    return (torch.nn.functional.pad(ent_BT, (1, 0)) * mask_BT).sum()
