"""Spec rules the run file, `opd validate` and the CRD must agree on: the run name's limit (one definition,
in contract.py) and eval targets that name a stage the run does not enable."""

from __future__ import annotations

import pytest

from opd_runtime.contract import MAX_RUN_NAME_LENGTH, RUN_NAME_PATTERN
from opd_runtime.spec import SpecError, parse_run


def doc(name: str = "r", **spec) -> dict:
    base = {"student": {"model": "s"}, "teacher": {"model": "t"}, "distill": {"prompts": {"name": "tinymath"}}}
    base.update(spec)
    return {"apiVersion": "opd.dev/v1alpha1", "kind": "DistillationRun", "metadata": {"name": name}, "spec": base}


def error_of(d: dict) -> str:
    with pytest.raises(SpecError) as exc:
        parse_run(d)
    return str(exc.value)


def test_run_name_limit_is_the_crds_and_leaves_room_for_child_names():
    from opd_operator import crd, names

    assert parse_run(doc("a" * MAX_RUN_NAME_LENGTH)).metadata.name == "a" * MAX_RUN_NAME_LENGTH
    assert "metadata.name" in error_of(doc("a" * (MAX_RUN_NAME_LENGTH + 1)))
    assert "metadata.name" in error_of(doc("1abc"))  # <run>-teacher names a Service: a letter first
    rules = {
        r["rule"] for r in crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    }
    assert f"self.metadata.name.size() <= {MAX_RUN_NAME_LENGTH}" in rules
    assert f"self.metadata.name.matches('{RUN_NAME_PATTERN}')" in rules
    # the longest child name: a distill Job at attempt 99, plus the Job controller's 6-character pod suffix,
    # is still a valid label value (pods carry their Job's name as one)
    longest = "a" * MAX_RUN_NAME_LENGTH
    assert len(names.job(longest, "distill", 99)) + len("-xxxxx") <= 63
    assert len(names.teacher(longest)) <= 63 and len(names.workspace_claim(longest)) <= 63


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ({"eval": {"datasets": [{"name": "aime24"}], "targets": ["student", "sft"]}}, "sft"),
        (
            {
                "distill": {"prompts": {"name": "tinymath"}, "enabled": False},
                "eval": {"datasets": [{"name": "aime24"}]},  # the default target is `distill`
            },
            "distill",
        ),
        (
            {
                "sft": {"dataset": {"name": "tinymath"}, "enabled": False},
                "eval": {"datasets": [{"name": "aime24"}], "targets": ["sft"]},
            },
            "sft",
        ),
    ],
)
def test_eval_target_of_a_stage_the_run_does_not_enable_is_refused(spec, target):
    msg = error_of(doc(**spec))
    assert "spec" in msg and "eval.targets" in msg and f"`{target}`" in msg and f"enable spec.{target}" in msg


def test_eval_targets_of_enabled_stages_and_models_are_accepted():
    run = parse_run(
        doc(
            sft={"dataset": {"name": "tinymath"}},
            eval={"datasets": [{"name": "aime24"}], "targets": ["student", "sft", "distill", "teacher"]},
        )
    )
    assert run.spec.eval is not None and run.spec.eval.targets == ["student", "sft", "distill", "teacher"]
    # a disabled eval stage is not checked: its targets are never scored
    parse_run(doc(eval={"datasets": [{"name": "aime24"}], "targets": ["sft"], "enabled": False}))


def test_crd_rule_for_eval_targets_mirrors_the_spec():
    from opd_operator import crd

    spec_rules = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    messages = [r["message"] for r in spec_rules["x-kubernetes-validations"]]
    assert any("spec.eval.targets names a stage this run does not enable" in m for m in messages)
