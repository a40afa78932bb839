"""The distill stage's recipe-faithful defaults (no gradient clipping unless asked) and the estimator
option that is off by default (log-ratio clipping)."""

from __future__ import annotations

import pytest
import torch

from opd_runtime.distill.loss import advantages
from opd_runtime.spec import SpecError, parse_run
from opd_runtime.training.loop import optimizer_step


def run_with(distill: dict, sft: dict | None = None):
    spec = {
        "student": {"model": "s"},
        "teacher": {"model": "t", "backend": "local"},
        "distill": {"prompts": {"name": "tinymath"}, **distill},
    }
    if sft is not None:
        spec["sft"] = {"dataset": {"name": "tinymath"}, **sft}
    return parse_run(
        {"apiVersion": "opd.dev/v1alpha1", "kind": "DistillationRun", "metadata": {"name": "d"}, "spec": spec}
    )


def test_distill_clips_no_gradients_unless_asked_and_sft_keeps_its_clip():
    run = run_with({"optimizer": {"learningRate": 3e-4}}, sft={})
    assert run.spec.distill.optimizer.max_grad_norm is None  # also when other optimizer fields are given
    assert run.spec.distill.log_ratio_clip is None
    assert run.spec.sft.optimizer.max_grad_norm == 1.0
    assert run_with({"optimizer": {"maxGradNorm": 1.0}}).spec.distill.optimizer.max_grad_norm == 1.0
    with pytest.raises(SpecError, match="maxGradNorm"):
        run_with({"optimizer": {"maxGradNorm": 0}})
    with pytest.raises(SpecError, match="logRatioClip"):
        run_with({"logRatioClip": -1})


def test_an_optimizer_step_without_a_clip_applies_the_whole_gradient_and_reports_its_norm():
    for max_norm, expected_scale in ((None, 1.0), (1.0, 0.1)):
        w = torch.nn.Parameter(torch.zeros(2))
        model = torch.nn.Module()
        model.w = w
        opt = torch.optim.SGD([w], lr=1.0)  # plain SGD: the step is the (clipped) gradient itself
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        w.grad = torch.tensor([6.0, 8.0])  # norm 10
        norm, _ = optimizer_step(model, opt, sched, max_norm)
        assert norm == pytest.approx(10.0)
        assert w.detach().tolist() == pytest.approx([-6.0 * expected_scale, -8.0 * expected_scale])


def test_log_ratio_clip_bounds_each_tokens_advantage_and_is_off_by_default():
    student_BT = torch.tensor([[-0.1, -2.0, -0.5, 0.0]])
    teacher_BT = torch.tensor([[-25.0, -0.1, -0.5, -9.0]])  # a token the teacher rules out: log-ratio 24.9
    mask_BT = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    plain = advantages(student_BT, teacher_BT, mask_BT)
    assert plain.tolist()[0] == pytest.approx([-24.9, 1.9, 0.0, 0.0])
    clipped = advantages(student_BT, teacher_BT, mask_BT, log_ratio_clip=5.0)
    assert clipped.tolist()[0] == pytest.approx([-5.0, 1.9, 0.0, 0.0])  # only the tail is cut; padding stays 0
    # with a discount the clipped per-token terms are what is summed
    disc = advantages(student_BT, teacher_BT, mask_BT, discount=1.0, log_ratio_clip=5.0)
    assert disc.tolist()[0] == pytest.approx([-3.1, 1.9, 0.0, 0.0])
