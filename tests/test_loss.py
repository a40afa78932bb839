"""The OPD advantages and losses against values computed by hand."""

import math

import pytest
import torch

from opd_runtime.distill import loss as L

# Two sequences, four positions; position 0 is prompt, row 1 ends with padding.
MASK = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
STUDENT = torch.tensor([[-9.0, -1.0, -2.0, -0.5], [-9.0, -0.1, -3.0, -7.0]])
TEACHER = torch.tensor([[-1.0, -1.5, -1.0, -0.5], [-5.0, -0.2, -1.0, -1.0]])


def test_advantage_is_negative_reverse_kl_per_token():
    adv = L.advantages(STUDENT, TEACHER, MASK, kl_coef=1.0)
    # -(s - t) on completion tokens, 0 elsewhere
    expected = torch.tensor([[0.0, -0.5, 1.0, 0.0], [0.0, -0.1, 2.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_kl_coef_scales_advantage():
    a1 = L.advantages(STUDENT, TEACHER, MASK, kl_coef=1.0)
    a3 = L.advantages(STUDENT, TEACHER, MASK, kl_coef=3.0)
    assert torch.allclose(a3, 3 * a1)


def test_discount_sums_future_completion_terms_only():
    adv = L.advantages(STUDENT, TEACHER, MASK, kl_coef=1.0, discount=0.5)
    # row 0 rewards r = [0, -0.5, 1.0, 0.0]: A3 = 0, A2 = 1.0, A1 = -0.5 + 0.5 * 1.0 = 0.0
    # row 1 rewards r = [0, -0.1, 2.0, 0(pad)]: A2 = 2.0, A1 = -0.1 + 1.0 = 0.9
    expected = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.9, 2.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)


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
    assert loss.item() == pytest.approx(-(-0.5 + 2.0 + 0.0 - 0.1 + 2.0) / 5.0, abs=1e-6)
    loss.backward()
    # d/dnew of -ratio*A/N is -ratio*A/N at completion tokens, zero at prompt and padding
    expected = -torch.tensor([[0.0, -0.5, 2.0, 0.0], [0.0, -0.1, 2.0, 0.0]]) / 5.0
    assert torch.allclose(new.grad, expected, atol=1e-6)


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
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 1.1) / 3.0, abs=1e-6)


def test_ppo_equals_importance_sampling_on_policy():
    adv = L.advantages(STUDENT, TEACHER, MASK)
    a = L.ppo_loss(STUDENT, STUDENT, adv, MASK, 5.0)
    b = L.importance_sampling_loss(STUDENT, STUDENT, adv, MASK, 5.0)
    assert a.item() == pytest.approx(b.item())


def test_entropy_of_uniform_distribution():
    logits = torch.zeros(1, 3, 4)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    assert L.masked_entropy_sum(logits, mask).item() == pytest.approx(2 * math.log(4), rel=1e-6)
