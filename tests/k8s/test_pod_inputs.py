"""Pod inputs (``spec.pod`` and each stage's ``pod``): env, envFrom, imagePullSecrets, priorityClassName,
runtimeClassName, nodeSelector, tolerations, affinity, shmSize, on every stage Job and the teacher Deployment.

The pure tests check the manifests and the merge rule; the ``k8s`` test runs the operator on the real
control plane, where admission (Priority, RuntimeClass, PodSecurity) and validation accept the pods and the
scheduler places them by the given affinity.
"""

from __future__ import annotations

from typing import Any

import pytest

from opd_operator import children
from opd_runtime.spec import SpecError, parse_run

from support.controlplane import ControlPlane
from support.opd_fake_cluster import tiny_run
from support.operator_harness import Operator, Run, tiny_math

HF_TOKEN = {"secretRef": {"name": "hf-token"}}
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}
            ]
        }
    }
}
RUN_POD: dict[str, Any] = {
    "env": [
        {"name": "NCCL_DEBUG", "value": "INFO"},
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
    ],
    "envFrom": [HF_TOKEN],
    "imagePullSecrets": ["registry"],
    "priorityClassName": "training",
    "runtimeClassName": "nvidia",
    "nodeSelector": {"pool": "h100"},
    "tolerations": [{"key": "gpu", "operator": "Exists"}],
    "affinity": AFFINITY,
    "shmSize": "16Gi",
}


def pod_of(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def every_pod(obj: dict) -> dict[str, dict]:
    run = parse_run(obj)
    out = {stage: pod_of(children.stage_job(obj, run, stage, 1)) for stage in ("sft", "distill", "eval")}
    out["teacher"] = pod_of(children.teacher_deployment(obj, run))
    return out


def env_names(container: dict) -> list[str]:
    return [e["name"] for e in container["env"]]


def shm(pod: dict) -> dict:
    return next(v["emptyDir"] for v in pod["volumes"] if v["name"] == "dshm")


def test_run_level_inputs_reach_every_stage_job_and_the_teacher():
    obj = tiny_run(pod=RUN_POD, nodeSelector={"zone": "a"})
    for stage, pod in every_pod(obj).items():
        (c,) = pod["containers"]
        assert env_names(c)[:2] == ["NCCL_DEBUG", "WANDB_API_KEY"], stage
        assert c["env"][1]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "key", "optional": False}}
        assert "OPD_RUN_NAME" in env_names(c)  # the operator's own still follow
        assert c["envFrom"] == [{"secretRef": {"name": "hf-token", "optional": False}}], stage
        assert pod["imagePullSecrets"] == [{"name": "registry"}]
        assert pod["priorityClassName"] == "training" and pod["runtimeClassName"] == "nvidia"
        assert pod["nodeSelector"] == {"zone": "a", "pool": "h100"}  # spec.nodeSelector and spec.pod's
        assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
        assert pod["affinity"] == AFFINITY
        assert shm(pod) == {"medium": "Memory", "sizeLimit": "16Gi"}, stage


def test_without_inputs_the_pods_are_as_before():
    for stage, pod in every_pod(tiny_run()).items():
        assert not {"imagePullSecrets", "priorityClassName", "runtimeClassName", "affinity"} & pod.keys(), stage
        assert "envFrom" not in pod["containers"][0]
        assert shm(pod) == {"medium": "Memory"}


def test_a_stage_pod_is_merged_over_the_runs_by_the_documented_rule():
    obj = tiny_run(pod=RUN_POD)
    obj["spec"]["eval"]["pod"] = {
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "EXTRA", "value": "1"}],
        "envFrom": [{"configMapRef": {"name": "eval-settings"}, "prefix": "EVAL_"}],
        "imagePullSecrets": ["mirror"],
        "priorityClassName": "batch-low",
        "nodeSelector": {"pool": "l4"},
        "tolerations": [{"key": "spot", "operator": "Exists"}],
        "shmSize": "2Gi",
    }
    obj["spec"]["teacher"]["serving"]["pod"] = {"affinity": {"podAntiAffinity": {}}, "runtimeClassName": "kata"}
    pods = every_pod(obj)
    ev = pods["eval"]
    (c,) = ev["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NCCL_DEBUG"] == "WARN" and env["EXTRA"] == "1" and "WANDB_API_KEY" in env  # by name, stage wins
    assert c["envFrom"] == [
        {"secretRef": {"name": "hf-token", "optional": False}},
        {"configMapRef": {"name": "eval-settings", "optional": False}, "prefix": "EVAL_"},
    ]  # appended
    assert ev["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}]
    assert ev["priorityClassName"] == "batch-low" and ev["runtimeClassName"] == "nvidia"  # replaced when set
    assert ev["nodeSelector"] == {"pool": "l4"}
    assert ev["tolerations"] == [{"key": "gpu", "operator": "Exists"}, {"key": "spot", "operator": "Exists"}]
    assert ev["affinity"] == AFFINITY and shm(ev)["sizeLimit"] == "2Gi"
    teacher = pods["teacher"]
    assert teacher["affinity"] == {"podAntiAffinity": {}} and teacher["runtimeClassName"] == "kata"
    assert pods["sft"]["priorityClassName"] == "training"  # other stages keep the run's


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        ({"env": [{"name": "OPD_RUN_NAME", "value": "x"}]}, "env OPD_RUN_NAME: the operator sets"),
        ({"env": [{"name": "HF_HOME", "value": "/x"}]}, "env HF_HOME"),
        (
            {"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            "set `value` or `valueFrom`, not both",
        ),
        ({"env": [{"name": "A", "valueFrom": {}}]}, "exactly one of `secretKeyRef` and `configMapKeyRef`"),
        ({"envFrom": [{"prefix": "X_"}]}, "exactly one of `secretRef` and `configMapRef`"),
        ({"env": [{"name": "1A=", "value": "1"}]}, "spec.pod.env.0.name"),
        ({"shmSize": "lots"}, "spec.pod.shmSize"),
        ({"imagePullSecret": ["x"]}, "did you mean `imagePullSecrets`?"),
    ],
)
def test_bad_pod_inputs_are_refused_naming_the_field(pod: dict, expected: str):
    with pytest.raises(SpecError) as err:
        parse_run(tiny_run(pod=pod))
    assert "spec.pod" in str(err.value) and expected in str(err.value), str(err.value)


# ---- on the real control plane ---------------------------------------------------------------------------


def test_the_api_server_accepts_the_pods_and_they_carry_the_inputs(cp: ControlPlane, ns: str, operator: Operator):
    priority, runtime = f"{ns}-training"[:60], f"{ns}-nvidia"[:60]
    cp.apply(
        [
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": priority},
                "value": 1000,
            },
            {
                "apiVersion": "node.k8s.io/v1",
                "kind": "RuntimeClass",
                "metadata": {"name": runtime},
                "handler": "nvidia",
            },
        ]
    )
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "hf-token"},
                "stringData": {"HF_TOKEN": "hf_x"},
            },
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "wandb"}, "stringData": {"key": "w"}},
        ],
        namespace=ns,
    )
    doc = tiny_math("inputs")
    doc["spec"]["sft"]["enabled"] = False
    doc["spec"]["eval"]["targets"] = ["student", "distill"]
    doc["spec"]["pod"] = {**RUN_POD, "priorityClassName": priority, "runtimeClassName": runtime, "nodeSelector": {}}
    doc["spec"]["pod"]["tolerations"] = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    run = Run(cp, ns, doc)
    run.wait("distill running", lambda st: (st.get("stages", {}).get("distill") or {}).get("phase") == "Running")
    learner = run.running_pod("inputs-distill-1")  # admitted, scheduled by the affinity, running
    teacher = cp.wait_for_pod(
        ns, "opd.dev/run=inputs,opd.dev/stage=teacher", lambda p: p["status"].get("phase") == "Running", "Running"
    )
    for pod in (learner, teacher):
        spec = pod["spec"]
        (c,) = spec["containers"]
        assert c["envFrom"] == [{"secretRef": {"name": "hf-token", "optional": False}}]
        assert {
            "name": "WANDB_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key", "optional": False}},
        } in c["env"]
        assert spec["imagePullSecrets"] == [{"name": "registry"}]
        assert spec["priorityClassName"] == priority and spec["priority"] == 1000  # resolved by admission
        assert spec["runtimeClassName"] == runtime
        assert spec["affinity"] == AFFINITY and spec["nodeName"] == "gpu-node-0"
        assert shm(spec) == {"medium": "Memory", "sizeLimit": "16Gi"}
