"""``teacher.serving.placement: sidecar``: the teacher server as a native sidecar of each distill pod.

With the default placement the teacher is a Deployment of its own, so Kueue admits it apart from the
learner and it can hold its GPUs while the learner waits in the queue. As a sidecar (a restartable init
container) its GPUs are part of the distill Job's pods: one Job, one Kueue workload, nothing held while
queued. Checked here: the manifests (fake cluster and pure builders), the walk of a whole run without a
teacher Deployment, the spec rules on both sides, and the real API server accepting the Job under Pod
Security ``restricted``.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from opd_operator import children, names
from opd_runtime.plan import planned_stages
from opd_runtime.spec import SpecError, parse_run

from support.controlplane import ControlPlane
from support.opd_fake_cluster import ROOT, Story, cond, tiny_run

EXAMPLE = ROOT / "examples" / "tiny-math.yaml"


def teacher(**serving) -> dict:
    spec = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"]["teacher"])
    spec["serving"] = {**spec["serving"], "placement": "sidecar", **serving}
    return spec


def distill_pod(s: Story) -> dict:
    (job,) = [j for j in s.api.of_kind("Job") if j["metadata"]["name"].startswith("tiny-distill-")]
    return job["spec"]["template"]["spec"]


def test_the_distill_pod_carries_the_teacher_and_no_deployment_is_made():
    s = Story(teacher=teacher(), queueName="team-a")
    s.reconcile()
    s.api.set_suspend("tiny-sft-1", False)  # Kueue's admission
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400, "checkpoint": "/workspace/sft/final"})
    s.reconcile()
    # no teacher Deployment, Service or NetworkPolicy to wait for: distill starts right after SFT
    assert s.api.names("Deployment") == s.api.names("Service") == s.api.names("NetworkPolicy") == []
    assert "tiny-distill-1" in s.jobs() and "teacher" not in s.status["stages"]
    pod = distill_pod(s)
    (sidecar,) = pod["initContainers"]
    (learner,) = pod["containers"]
    assert sidecar["name"] == "teacher" and sidecar["restartPolicy"] == "Always"
    argv = sidecar["command"]
    assert "serve-teacher" in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert learner["command"][learner["command"].index("--teacher-url") + 1] == "http://127.0.0.1:8000"
    # the kubelet cannot reach loopback from outside the pod: the probes run inside the container
    probe = sidecar["startupProbe"]
    assert "httpGet" not in probe and "127.0.0.1:8000/health" in probe["exec"]["command"][-1]
    assert probe["failureThreshold"] * probe["periodSeconds"] >= 1800  # readyTimeoutSeconds' default
    assert "ports" not in sidecar
    # the teacher's model cache beside the learner's workspace, each volume once
    volumes = [v["name"] for v in pod["volumes"]]
    assert sorted(volumes) == sorted(set(volumes)) and {"workspace", "model-cache", "spec", "dshm"} <= set(volumes)
    assert {m["name"] for m in sidecar["volumeMounts"]} == {"model-cache", "spec", "dshm"}
    # one Kueue workload: the queue label on the distill Job, nothing else queued on its own
    (job,) = [j for j in s.api.of_kind("Job") if j["metadata"]["name"] == "tiny-distill-1"]
    assert job["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "team-a" and job["spec"]["suspend"] is True


def test_a_sidecar_run_walks_to_succeeded_without_a_teacher_stage():
    s = Story(teacher=teacher())
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400, "checkpoint": "/workspace/sft/final"})
    s.reconcile()
    s.api.finish_job("tiny-distill-1", 0, {"stage": "distill", "step": 200, "checkpoint": "/workspace/d/final"})
    s.reconcile()
    s.api.finish_job("tiny-eval-1", 0, {"stage": "eval", "results": "/workspace/results/eval.json"})
    s.reconcile()
    assert s.status["phase"] == "Succeeded", s.status
    assert sorted(s.status["stages"]) == ["distill", "eval", "sft"]
    assert all(c["type"] != "TeacherReady" for c in s.status["conditions"])
    assert cond(s.status, "Ready")["status"] == "True"
    assert s.api.names("Deployment") == []


def test_a_pod_whose_sidecar_teacher_still_loads_has_not_failed_to_start():
    """The distill pod stays initializing (Pending) while its sidecar loads the model: the start deadline
    counts from the end of the teacher's own budget (readyTimeoutSeconds), not from the Job's start."""
    s = Story(teacher=teacher(readyTimeoutSeconds=600), startTimeoutSeconds=120)
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400, "checkpoint": "/workspace/sft/final"})
    s.reconcile()
    s.api.objects[("Job", "ns", "tiny-distill-1")]["status"] = {"startTime": "2026-11-25T12:00:02Z"}
    (pod,) = [o for o in s.api.of_kind("Pod") if o["metadata"]["labels"].get("job-name") == "tiny-distill-1"]
    pod["status"] = {"phase": "Pending", "initContainerStatuses": [{"name": "teacher", "started": True}]}
    d = s.reconcile(300)  # past startTimeoutSeconds alone, within it plus the teacher's 600 s
    assert "tiny-distill-1" in s.jobs() and s.status["stages"]["distill"]["failures"] == 0
    assert 400 < d.requeue_after <= 720 + 1
    d = s.reconcile(d.requeue_after + 1)
    assert "StageStartTimeout" in [e.reason for e in d.events]


def test_the_memory_plan_still_counts_the_teacher_and_the_deployment_placement_is_unchanged():
    run = parse_run(tiny_run(teacher=teacher()))
    assert "teacher" in planned_stages(run)  # its GPUs and memory are still planned
    assert "teacher" not in children.operator_stages(run)
    default = parse_run(tiny_run())
    assert children.operator_stages(default) == planned_stages(default)
    assert children.deploys_teacher(default) and not children.teacher_sidecar(default)


@pytest.mark.parametrize(
    ("serving", "distill", "expected"),
    [
        ({"replicas": 2}, {}, "with placement `sidecar`: a sidecar teacher serves only the distill pod"),
        ({"port": 9400}, {"metricsPort": 9400}, "teacher.serving.port 9400 is also distill.metricsPort"),
    ],
)
def test_what_a_sidecar_cannot_do_is_refused_naming_the_fields(serving, distill, expected):
    doc = tiny_run(teacher=teacher(**serving))
    doc["spec"]["distill"].update(distill)
    with pytest.raises(SpecError, match=expected):
        parse_run(doc)


def test_the_api_server_accepts_the_sidecar_job_under_pod_security_restricted(
    control_plane: ControlPlane, k8s_namespace: str
):
    control_plane.kubectl(
        "label", "namespace", k8s_namespace, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    obj = tiny_run(teacher=teacher(), namespace=k8s_namespace)
    job = children.stage_job(obj, parse_run(obj), "distill", 1)
    job["metadata"].pop("ownerReferences", None)  # the run object does not exist in this namespace
    out = control_plane.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(job)).stdout
    created = json.loads(out)["spec"]["template"]["spec"]
    assert created["initContainers"][0]["restartPolicy"] == "Always"
    assert created["initContainers"][0]["name"] == "teacher"
    # Pod Security admission enforces on pods (a Job only draws a warning): the pod the Job would make
    template = job["spec"]["template"]
    meta = {"name": "tiny-distill-1-x", "namespace": k8s_namespace, **template["metadata"]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}
    control_plane.kubectl("create", "serviceaccount", "-n", k8s_namespace, template["spec"]["serviceAccountName"])
    proc = control_plane.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert proc.returncode == 0 and "created (server dry run)" in proc.stdout, proc.stderr
