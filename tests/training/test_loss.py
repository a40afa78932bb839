"""The OPD advantages and losses against values computed by hand."""

import math

import pytest
import torch

from opd_runtime.distill import loss as L

from support.numerics import TINY_MODEL_REL, assert_close, normwise_error, sum_rel

pytestmark = pytest.mark.cpu_kernels  # hand-computed values and the learner's gradients

# Two sequences, four positions; position 0 is prompt, row 1 ends with padding.
MASK = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
STUDENT = torch.tensor([[-9.0, -1.0, -2.0, -0.5], [-9.0, -0.1, -3.0, -7.0]])
TEACHER = torch.tensor([[-1.0, -1.5, -1.0, -0.5], [-5.0, -0.2, -1.0, -1.0]])
# float32 arithmetic over at most these 8 positions (values of size ~1, exp/log of a ratio included) against
# values worked out by hand: a few roundings of eps each, whatever the kernel.
REL = sum_rel(8)  # ~1.9e-6
WHY = "float32 over 8 positions vs exact values"


def test_advantage_is_negative_reverse_kl_per_token():
    adv = L.advantages(STUDENT, TEACHER, MASK, kl_coef=1.0)
    # -(s - t) on completion tokens, 0 elsewhere
    expected = torch.tensor([[0.0, -0.5, 1.0, 0.0], [0.0, -0.1, 2.0, 0.0]])
    assert_close(adv, expected, rel=REL, why=WHY)


def test_kl_coef_scales_advantage():
    a1 = L.advantages(STUDENT, TEACHER, MASK, kl_coef=1.0)
    a3 = L.advantages(STUDENT, TEACHER, MASK, kl_coef=3.0)
    assert_close(a3, 3 * a1, rel=REL, why=WHY)


def test_discount_sums_future_completion_terms_only():
    adv = L.advantages(STUDENT, TEACHER, MASK, kl_coef=1.0, discount=0.5)
    # row 0 rewards r = [0, -0.5, 1.0, 0.0]: A3 = 0, A2 = 1.0, A1 = -0.5 + 0.5 * 1.0 = 0.0
    # row 1 rewards r = [0, -0.1, 2.0, 0(pad)]: A2 = 2.0, A1 = -0.1 + 1.0 = 0.9
    expected = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.9, 2.0, 0.0]])
    assert_close(adv, expected, rel=REL, why=WHY)


def test_student_equal_to_teacher_gives_zero_advantage_and_kl():
    adv = L.advantages(STUDENT, STUDENT.clone(), MASK, discount=0.9)
    assert torch.count_nonzero(adv) == 0
    assert L.per_token_reverse_kl(STUDENT, STUDENT.clone(), MASK).sum() == 0


def test_importance_sampling_loss_value_and_gradient():
    new = STUDENT.clone().requires_grad_(True)
    old = STUDENT - torch.tensor([[0.0, 0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0, 0.0]])  # ratio 2 at (0, 2)
    adv = L.advantages(STUDENT, TEACHER, MASK)
    loss = L.importance_sampling_loss(new, old, adv, MASK, normalizer=5.0)
    # -(1*-0.5 + 2*1.0 + 1*0.0 + 1*-0.1 + 1*2.0) / 5
    assert_close(loss.item(), -(-0.5 + 2.0 + 0.0 - 0.1 + 2.0) / 5.0, rel=REL, why=WHY)
    loss.backward()
    # d/dnew of -ratio*A/N is -ratio*A/N at completion tokens, zero at prompt and padding
    expected = -torch.tensor([[0.0, -0.5, 2.0, 0.0], [0.0, -0.1, 2.0, 0.0]]) / 5.0
    assert_close(new.grad, expected, rel=REL, why=WHY)


def test_only_completion_tokens_count():
    new = STUDENT.clone().requires_grad_(True)
    huge = STUDENT.clone()
    huge[:, 0] = 100.0  # prompt position: garbage teacher/student values must not matter
    huge[1, 3] = -100.0  # padding position
    adv = L.advantages(huge, TEACHER, MASK)
    loss = L.importance_sampling_loss(new, STUDENT, adv, MASK, normalizer=5.0)
    loss.backward()
    assert new.grad[:, 0].abs().sum() == 0
    assert new.grad[1, 3] == 0


def test_ppo_loss_clips_large_ratios():
    adv = torch.tensor([[0.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))  # ratios
    loss = L.ppo_loss(new, old, adv, mask, normalizer=3.0, clip=0.2)
    # min(1.5*1, 1.2*1)=1.2 ; min(0.5*-1, 0.8*-1)=-0.8 ; min(1.1, 1.1)=1.1
    assert_close(loss.item(), -(1.2 - 0.8 + 1.1) / 3.0, rel=REL, why=WHY)


def test_ppo_equals_importance_sampling_on_policy():
    adv = L.advantages(STUDENT, TEACHER, MASK)
    a = L.ppo_loss(STUDENT, STUDENT, adv, MASK, 5.0)
    b = L.importance_sampling_loss(STUDENT, STUDENT, adv, MASK, 5.0)
    assert_close(a.item(), b.item(), rel=REL, why=WHY)


def test_entropy_of_uniform_distribution():
    logits = torch.zeros(1, 3, 4)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    assert_close(L.masked_entropy_sum(logits, mask).item(), 2 * math.log(4), rel=REL, why=WHY)


# --- truncated importance sampling (spec.distill.importanceRatioCap) -------------------------------------

# ratios at the completion tokens: 4 (above a cap of 2), 0.5 and 1.5 (below it), 3 (above); position 0 is
# prompt, and row 1's last position padding with a huge ratio that must not count
RATIOS = torch.tensor([[1.0, 4.0, 0.5, 1.5], [1.0, 3.0, 1.0, 50.0]])


def capped_case(ratios_BT: torch.Tensor, cap: float | None):
    new = STUDENT.clone().requires_grad_(True)
    old = STUDENT - torch.log(ratios_BT)
    adv = L.advantages(STUDENT, TEACHER, MASK)
    loss = L.importance_sampling_loss(new, old, adv, MASK, normalizer=5.0, ratio_cap=cap)
    loss.backward()
    return loss.detach(), new.grad, adv


def test_ratio_cap_weights_tokens_above_it_by_the_cap_and_leaves_the_rest():
    loss, grad, adv = capped_case(RATIOS, cap=2.0)
    weight = torch.tensor([[1.0, 2.0, 0.5, 1.5], [1.0, 2.0, 1.0, 2.0]])  # min(ratio, 2)
    assert_close(loss.item(), -float((weight * adv * MASK).sum()) / 5.0, rel=REL, why=WHY)
    # the truncated weight is a constant: gradient min(ratio, C) * A * grad log p, not zero above the cap
    assert_close(grad, -(weight * adv * MASK) / 5.0, rel=REL, why=WHY)
    assert grad[0, 1] != 0 and grad[1, 1] != 0
    # the uncapped loss differs exactly at the capped tokens: the test above can fail
    _, grad_off, _ = capped_case(RATIOS, cap=None)
    differs = (grad - grad_off).abs() > REL * grad_off.abs().max()
    assert differs.tolist() == [[False, True, False, False], [False, True, False, False]]


def test_ratio_cap_above_every_ratio_is_the_uncapped_loss_exactly():
    loss_off, grad_off, _ = capped_case(RATIOS, cap=None)
    loss_high, grad_high, _ = capped_case(RATIOS, cap=100.0)  # above every ratio, the padding's 50 included
    assert torch.equal(loss_high, loss_off) and torch.equal(grad_high, grad_off)
    # and the default (no cap) is the published loss: -sum(ratio * A) / N with gradient ratio * A
    adv = L.advantages(STUDENT, TEACHER, MASK)
    assert_close(loss_off.item(), -float((RATIOS * adv * MASK).sum()) / 5.0, rel=REL, why=WHY)
    assert_close(grad_off, -(RATIOS * adv * MASK) / 5.0, rel=REL, why=WHY)


def test_ratio_stats_sum_over_batches():
    stats = L.RatioStats()
    stats.add(torch.log(torch.tensor([4.0, 0.5])), torch.zeros(2), ratio_cap=2.0)
    stats.add(torch.log(torch.tensor([1.5])), torch.zeros(1), ratio_cap=2.0)
    stats.add(torch.zeros(0), torch.zeros(0), ratio_cap=2.0)
    # exp(log r) in float32 is r within a few eps: approx's default rel 1e-6 (~8 eps) holds on any CPU
    assert (stats.ratio_sum, stats.ratio_max, stats.capped, stats.tokens) == pytest.approx((6.0, 4.0, 1, 3))


def distill_doc(**distill) -> dict:
    spec = {"student": {"model": "s"}, "teacher": {"model": "t"}, "distill": {"prompts": {"name": "tinymath"}}}
    spec["distill"].update(distill)
    return {"apiVersion": "opd.dev/v1alpha1", "kind": "DistillationRun", "metadata": {"name": "r"}, "spec": spec}


def test_ratio_cap_is_off_by_default_and_validated():
    from opd_runtime.spec import SpecError, parse_run

    assert parse_run(distill_doc()).spec.distill.importance_ratio_cap is None
    assert parse_run(distill_doc(importanceRatioCap=2)).spec.distill.importance_ratio_cap == 2.0
    for bad in (1.0, 0.5, -2):
        with pytest.raises(SpecError, match=r"spec\.distill\.importanceRatioCap: Input should be greater than 1"):
            parse_run(distill_doc(importanceRatioCap=bad))
    for loss in ("ppo", "full_forward_kl"):
        with pytest.raises(SpecError, match=f"importanceRatioCap caps the ratio .* not of `{loss}`"):
            parse_run(distill_doc(importanceRatioCap=2, loss=loss))


def test_learner_caps_the_ratio_and_reports_it(random_models):
    """train_on_samples on real samples of a tiny student whose behaviour log-probs are made lower than the
    trainer's at every other token (ratio 4): with a cap of 2 its gradient is the uncapped one at ratio 2
    (the advantage kept equal by shifting the teacher's log-probs alike), and RatioStats sees ratio 4."""
    from opd_runtime import modeling
    from opd_runtime.distill.learner import train_on_samples
    from opd_runtime.distill.teacher import LocalTeacher
    from opd_runtime.generation import Sample, sample
    from opd_runtime.spec import DistillSpec
    from opd_runtime.training.batches import prompt_ids

    tok = modeling.load_tokenizer(str(random_models.student))
    model = modeling.load_causal_lm(str(random_models.student), dtype="float32")
    teacher = LocalTeacher(modeling.load_causal_lm(str(random_models.teacher), dtype="float32"))
    prompts = [prompt_ids(tok, [{"role": "user", "content": f"What is {a} + {a}?"}]) for a in (3, 41)]
    torch.manual_seed(0)
    samples = sample(model, tok, prompts, n=2, max_new_tokens=8)
    teacher_lp = teacher.score(samples)

    def shifted(ratio: float):
        """Samples and teacher log-probs with log(ratio) taken off every other completion token."""
        out, t_out = [], []
        for s, t in zip(samples, teacher_lp):
            d = [math.log(ratio) if j % 2 == 0 else 0.0 for j in range(len(s.logprobs))]
            out.append(Sample(**{**vars(s), "logprobs": [x - e for x, e in zip(s.logprobs, d)]}))
            t_out.append([x - e for x, e in zip(t, d)])
        return out, t_out

    def grads(samples_, teacher_lp_, cap):
        cfg = DistillSpec(
            prompts={"name": "tinymath"},
            prompts_per_step=2,
            samples_per_prompt=2,
            micro_batch_size=2,
            importance_ratio_cap=cap,
        )
        model.zero_grad(set_to_none=True)
        stats = train_on_samples(model, samples_, teacher_lp_, cfg, tok.pad_token_id)
        return stats, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    stats4, capped = grads(*shifted(4.0), cap=2.0)
    _, at_two = grads(*shifted(2.0), cap=None)
    _, uncapped = grads(*shifted(4.0), cap=None)
    # capped at 2 and exactly 2 differ by the rounding of exp(log 2) and of the model's sums
    assert_close(capped, at_two, rel=TINY_MODEL_REL, why="the tiny models' float32 sums", what="capped gradient")
    assert normwise_error(capped, uncapped) > 100 * TINY_MODEL_REL  # the check can fail: ratio 4 moves it
    n_shifted = sum((len(s.completion_ids) + 1) // 2 for s in samples)
    assert stats4.ratio.tokens == sum(len(s.completion_ids) for s in samples)
    assert stats4.ratio.capped == n_shifted
    # a ratio is exp(trainer log-prob - sampler log-prob): the two paths' log-probs (one forward, cached
    # decoding) differ by their rounding, < TINY_MODEL_REL nats of log-probs of size < 10, hence 10x
    why = "exp of a log-prob gap of the two paths' rounding"
    assert_close(stats4.ratio.ratio_max, 4.0, rel=10 * TINY_MODEL_REL, why=why, what="ratio_max")
    n = stats4.ratio.tokens
    mean = (4.0 * n_shifted + (n - n_shifted)) / n
    assert_close(stats4.ratio.ratio_sum / n, mean, rel=10 * TINY_MODEL_REL, why=why, what="mean ratio")
