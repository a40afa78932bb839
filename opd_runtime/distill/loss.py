"""Per-token reverse-KL advantages and the policy-gradient losses of the OPD learner.

Shapes: B sequences by T positions. ``mask_BT`` is 1 on completion tokens (the only tokens that carry an
advantage or a loss) and 0 on prompt and padding positions. Log-probs at position t are the log-prob of
token t given tokens < t.
"""

from __future__ import annotations

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


def full_reverse_kl_loss(student_logits_BTV: torch.Tensor, teacher_logprobs_BTV: torch.Tensor,
                         mask_BT: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Exact reverse KL over the whole vocabulary at every sampled position, differentiated through the student.

    sum_t sum_v p_s(v | x_<t) (log p_s(v | x_<t) - log p_t(v | x_<t)) / normalizer. The contexts are the
    student's own samples (on-policy); each position's KL is computed exactly instead of estimated from
    the one token sampled there, which removes the estimator's variance. Needs the teacher's full
    distribution, so only a local teacher (or a shared small vocabulary) can provide it.
    """
    logp_s = torch.log_softmax(student_logits_BTV[:, :-1].float(), dim=-1)
    kl_BT = (logp_s.exp() * (logp_s - teacher_logprobs_BTV[:, :-1].float())).sum(-1)
    return (torch.nn.functional.pad(kl_BT, (1, 0)) * mask_BT).sum() / normalizer


def full_forward_kl_loss(student_logits_BTV: torch.Tensor, teacher_logprobs_BTV: torch.Tensor,
                         mask_BT: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Forward KL(teacher || student) over the whole vocabulary at every position the student sampled.

    The generalized-KD variant (on-policy contexts, teacher-weighted targets): unlike reverse KL its
    gradient pulls the student toward the teacher's choice even where the student gives it almost no mass.
    """
    logp_s = torch.log_softmax(student_logits_BTV[:, :-1].float(), dim=-1)
    logp_t = teacher_logprobs_BTV[:, :-1].float()
    kl_BT = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    return (torch.nn.functional.pad(kl_BT, (1, 0)) * mask_BT).sum() / normalizer


def masked_entropy_sum(logits_BTV: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sum over completion positions of the entropy of the distribution that predicted each token."""
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    ent_BT = -(logp.exp() * logp).sum(-1)
    return (torch.nn.functional.pad(ent_BT, (1, 0)) * mask_BT).sum()
