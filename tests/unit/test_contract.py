"""The stage contract (opd_runtime.contract) as the operator's pods and `opd run` see it: every stage
command, and so every stage container, runs with vLLM's usage statistics off, and the facts the operator
and the stages share are the contract's."""

from __future__ import annotations

from pathlib import Path

import yaml

from opd_operator import children, crd
from opd_runtime import contract, plan
from opd_runtime.spec import parse_run

ROOT = Path(__file__).resolve().parents[2]


def tiny_math() -> tuple[dict, object]:
    obj = yaml.safe_load((ROOT / "examples" / "tiny-math.yaml").read_text())
    obj["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    obj["spec"]["teacher"]["backend"] = "vllm-server"  # the run then has its own teacher server
    obj["spec"]["teacher"].setdefault("serving", {}).pop("url", None)
    return obj, parse_run(obj)


def env_of(manifest: dict) -> dict[str, str]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def test_every_stage_command_and_container_turns_vllm_usage_stats_off():
    obj, run = tiny_math()
    stages = plan.planned_stages(run)
    assert stages == list(contract.STAGES)  # sft, teacher, distill, eval: every kind of stage is covered
    for stage in stages:
        cmd = plan.stage_command(run, stage, config="/etc/opd/run.yaml", workspace="/workspace")
        assert contract.NO_USAGE_STATS_ENV.items() <= cmd.env.items(), stage
    pods = [children.stage_job(obj, run, s, 1) for s in contract.BATCH_STAGES]
    pods.append(children.teacher_deployment(obj, run))
    for manifest in pods:
        assert env_of(manifest).items() >= contract.NO_USAGE_STATS_ENV.items(), manifest["metadata"]["name"]
        assert env_of(manifest)["VLLM_NO_USAGE_STATS"] == "1" and env_of(manifest)["DO_NOT_TRACK"] == "1"


def test_the_crd_and_the_operator_use_the_contracts_names():
    generated = crd.crd()
    assert generated["spec"]["group"] == contract.GROUP
    assert (
        generated["spec"]["names"]["plural"] == contract.PLURAL and generated["spec"]["names"]["kind"] == contract.KIND
    )
    assert [v["name"] for v in generated["spec"]["versions"]] == [contract.VERSION]
    assert f"{contract.GROUP}/{contract.VERSION}" == contract.API_VERSION
