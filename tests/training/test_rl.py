"""The RL baseline (``spec.distill.objective: rl``): the verifiable reward, GRPO-style group advantages,
no teacher anywhere in the plan, and the learner running it on the trained tiny world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from opd_operator import driver
from opd_runtime import modeling, tinymath
from opd_runtime.distill import rl
from opd_runtime.distill.learner import run_distill, train_on_samples
from opd_runtime.generation import sample
from opd_runtime.plan import planned_stages, serves_teacher
from opd_runtime.spec import DistillSpec, SpecError, parse_run
from opd_runtime.tiny_models import WorldConfig, build_cached
from opd_runtime.training.batches import prompt_ids, token_logprobs

from support.models import cache_dir
from support.opd_fake_cluster import FakeApi, tiny_run
from support.runs import run_doc

# --- group advantages ---------------------------------------------------------------------------------


def test_group_advantages_normalise_each_prompt_by_its_own_mean_and_std():
    adv = rl.group_advantages([1, 0, 0, 0, 1, 1, 0, 0], 4)
    # group 1: mean 0.25, sample std sqrt(0.75 / 3) = 0.5; group 2: mean 0.5, std sqrt(1 / 3)
    s1, s2 = 0.5 + rl.STD_EPS, math.sqrt(1 / 3) + rl.STD_EPS
    expected = [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1, 0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2]
    assert adv == pytest.approx(expected)
    assert sum(adv[:4]) == pytest.approx(0) and sum(adv[4:]) == pytest.approx(0)
    # the one success in four gets a larger advantage than each of two successes in four
    assert adv[0] > adv[4] > 0


def test_group_advantages_without_std_scaling_only_subtract_the_group_mean():
    assert rl.group_advantages([1, 0, 0, 0, 1, 1, 0, 0], 4, scale_by_std=False) == pytest.approx(
        [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    )


def test_zero_variance_groups_get_zero_advantage_and_are_counted():
    rewards = [1, 1, 1, 0, 0, 0, 1, 0, 1]
    adv = rl.group_advantages(rewards, 3)
    assert adv[:6] == [0.0] * 6
    assert adv[6:] == pytest.approx([0.577, -1.155, 0.577], abs=1e-3)
    assert rl.group_advantages(rewards, 3, scale_by_std=False)[:6] == [0.0] * 6
    assert rl.zero_variance_fraction(rewards, 3) == pytest.approx(2 / 3)
    assert rl.zero_variance_fraction([0, 1], 2) == 0.0


def test_group_advantages_reject_rewards_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        rl.group_advantages([1, 0, 0], 4)


# --- the reward: graded as eval grades -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["aime", "math"])
def test_reward_is_one_for_the_right_boxed_answer_and_zero_for_unboxed_or_wrong(kind):
    completions = [
        "<think>3+4=7</think> The answer is \\boxed{7}.",
        "<think>3+4=7</think> The answer is 7.",  # right number, but not boxed
        "\\boxed{8}",  # wrong
        "\\boxed{7} then \\boxed{9}",  # the last box counts
        "\\boxed{007}",  # integers compare as integers
    ]
    assert rl.rewards(completions, ["7"] * 5, kind) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_reward_kind_decides_integer_or_math_verify():
    # \frac{50}{2} is 25 to math-verify (kind math), but not an integer numeral (kind aime)
    assert rl.rewards(["\\boxed{\\frac{50}{2}}"], ["25"], "aime") == [0.0]
    assert rl.rewards(["\\boxed{\\frac{50}{2}}"], ["25"], "math") == [1.0]
    assert rl.rewards(["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{1/3}"], ["0.5"] * 3, "math") == [1.0, 1.0, 0.0]


def test_reward_refuses_prompts_without_a_reference_answer():
    with pytest.raises(ValueError, match="no reference answer"):
        rl.rewards(["\\boxed{1}"], [None], "math")


# --- the spec: no teacher for rl -------------------------------------------------------------------------


def rl_run(**distill):
    doc = run_doc("student", "teacher", objective="rl", samplesPerPrompt=4, microBatchSize=2, **distill)
    doc["spec"]["teacher"]["backend"] = "vllm-server"
    return parse_run(doc)


def test_rl_serves_no_teacher_and_validation_names_the_ignored_teacher_fields():
    run = rl_run()
    assert run.spec.distill is not None and run.spec.distill.objective == "rl"
    assert not serves_teacher(run) and "teacher" not in planned_stages(run)
    (note,) = run.spec.notes()
    for field in ("spec.teacher.backend", "spec.teacher.serving", "spec.distill.klCoef", "spec.distill.discount"):
        assert field in note
    distill_run = parse_run(run_doc("student", "teacher"))
    assert distill_run.spec.notes() == []
    assert DistillSpec.model_fields["objective"].default == "distill"


def test_rl_rejects_losses_that_need_a_teacher_and_groups_of_one():
    with pytest.raises(SpecError, match=r"spec\.distill.*objective rl has no teacher distribution"):
        rl_run(loss="full_forward_kl")
    with pytest.raises(SpecError, match=r"spec\.distill.*samplesPerPrompt to 2 or more"):
        parse_run(run_doc("s", "t", objective="rl", samplesPerPrompt=1, microBatchSize=1))


def test_operator_starts_no_teacher_deployment_for_rl():
    api = FakeApi()
    run = tiny_run()
    run["spec"]["distill"].update(objective="rl", loss="importance_sampling")
    api.add_run(run)
    driver.reconcile_once(api, "ns", "tiny")
    api.finish_job("tiny-sft-1", 0, {"stage": "sft"})
    driver.reconcile_once(api, "ns", "tiny")
    assert api.names("Deployment") == [] and api.names("Job") == ["tiny-distill-1", "tiny-sft-1"]
    assert all(c["type"] != "TeacherReady" for c in api.run()["status"]["conditions"])


def test_cli_validate_prints_the_note(tmp_path, capsys):
    from opd_runtime import cli

    doc = run_doc("student", "teacher", objective="rl", samplesPerPrompt=4, microBatchSize=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["validate", "--config", str(path)]) == 0
    assert "note: spec.distill.objective rl" in capsys.readouterr().out


# --- the learner --------------------------------------------------------------------------------------------


def test_a_positive_sample_advantage_raises_that_samples_logprob_and_a_negative_one_lowers_it(random_models):
    tok = modeling.load_tokenizer(str(random_models.student))
    model = modeling.load_causal_lm(str(random_models.student), dtype="float32")
    cfg = DistillSpec.model_validate(
        {"prompts": {"name": "tinymath"}, "objective": "rl", "samplesPerPrompt": 2, "microBatchSize": 2}
    )
    problem = tinymath.generate(1, split="test", seed=5)[0]
    torch.manual_seed(0)
    samples = sample(model, tok, [prompt_ids(tok, tinymath.chat_messages(problem.problem))], n=2, max_new_tokens=12)

    def seq_logprob(s) -> float:
        with torch.no_grad():
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            return float(token_logprobs(model(ids).logits, ids)[0, len(s.prompt_ids) :].sum())

    before = [seq_logprob(s) for s in samples]
    train_on_samples(model, samples, None, cfg, tok.pad_token_id, sample_advantages=[1.0, -1.0])
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = [seq_logprob(s) for s in samples]
    assert after[0] > before[0] and after[1] < before[1]


@pytest.fixture(scope="module")
def trained_world(tmp_path_factory) -> Path:
    """The trained tiny world (weak student ~20%): its rewards vary within a prompt's samples."""
    root = tmp_path_factory.mktemp("rl-world")
    build_cached(root / "models", WorldConfig(), cache_dir(), log=print)
    return root / "models"


def test_learner_with_objective_rl_trains_without_a_teacher_and_logs_rewards(trained_world, tmp_path):
    doc = run_doc(
        trained_world / "student",
        "/nowhere/teacher",  # never loaded: rl needs no teacher
        objective="rl",
        steps=3,
        promptsPerStep=8,
        samplesPerPrompt=4,
        microBatchSize=32,
        maxNewTokens=64,
        gradientCheckpointing=False,
        optimizer={"learningRate": 1e-3, "warmupSteps": 0, "schedule": "constant"},
        checkpointing={"every": 3, "keep": 1},
    )
    doc["spec"]["teacher"]["backend"] = "vllm-server"  # and no server is running either
    run = parse_run(doc)
    logs: list[str] = []
    result = run_distill(run, tmp_path / "ws", log=logs.append)
    lines = [json.loads(x) for x in (tmp_path / "ws" / "metrics" / "distill.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert r["reverse_kl"] is None
        assert 0.0 <= r["reward_mean"] <= 1.0 and 0.0 <= r["zero_variance_group_fraction"] <= 1.0
        # tinymath answers are integers: the reward and the step's sample accuracy grade alike
        assert r["reward_mean"] == pytest.approx(r["sample_accuracy"])
    # a ~20% student gets mixed groups: some steps carry a learning signal, and the weights move
    assert any(r["zero_variance_group_fraction"] < 1.0 for r in lines)
    assert any(r["grad_norm"] > 0 for r in lines)
    assert result["reward_mean_last"] == lines[-1]["reward_mean"]
    assert (tmp_path / "ws" / "checkpoints" / "distill" / "final").is_dir()
    assert any("no teacher is served, loaded or contacted" in x for x in logs)
