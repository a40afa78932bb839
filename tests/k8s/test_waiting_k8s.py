"""Pods that never start, and deadlines: the run says why (status.message, the Stalled condition, one Event)
and a stage or teacher that misses its deadline fails the attempt, retried per ``spec.retries``.

The pure tests feed ``observe.pod_waiting`` plain pod dicts and play the reconciler against FakeApi; the
``k8s`` tests run the operator (a subprocess with its own RBAC, as in test_operator_k8s.py) on the real
control plane, where the scheduler refuses pods no node can take, a claim with no volume stays Pending,
and a pod of image ``HELD_IMAGE`` is left Pending by kwok so the test writes what a kubelet would report.
"""

from __future__ import annotations

from typing import Any

import pytest

from opd_operator import children
from opd_operator.observe import pod_waiting, unlisted_claims
from opd_runtime.spec import parse_run

from support.controlplane import HELD_IMAGE, ControlPlane
from support.opd_fake_cluster import Story, cond, tiny_run
from support.operator_harness import TIMEOUT, Operator, Run, count_events, exists, tiny_math


def pod(
    *,
    phase: str = "Pending",
    scheduled: dict | None = None,
    waiting: str | None = None,
    claim: str | None = None,
    name: str = "p-1",
) -> dict:
    status: dict[str, Any] = {"phase": phase, "conditions": [scheduled] if scheduled else []}
    if waiting:
        status["containerStatuses"] = [{"name": "sft", "state": {"waiting": {"reason": waiting, "message": "m"}}}]
    volumes = [{"name": "w", "persistentVolumeClaim": {"claimName": claim}}] if claim else []
    return {
        "metadata": {"name": name, "labels": {"opd.dev/stage": "sft"}},
        "spec": {"volumes": volumes},
        "status": status,
    }


UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
}


def pvc(name: str, phase: str) -> dict:
    return {"metadata": {"name": name}, "spec": {"storageClassName": ""}, "status": {"phase": phase}}


# ---- the pure part: pods -> why they wait ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("waiting", "reason"),
    [
        ("ErrImagePull", "ImagePullError"),
        ("ImagePullBackOff", "ImagePullError"),
        ("InvalidImageName", "ImagePullError"),
        ("CreateContainerConfigError", "ContainerConfigError"),
        ("CrashLoopBackOff", "CrashLoopBackOff"),
        ("ContainerCreating", None),  # starting: nothing to report
    ],
)
def test_container_waiting_reasons_map_to_a_stalled_reason(waiting: str, reason: str | None):
    found = pod_waiting(pod(waiting=waiting), {})
    assert (found.reason if found else None) == reason
    if found:
        assert found.pod == "p-1" and waiting in found.message and "container sft" in found.message


def test_the_schedulers_reason_is_reported_and_an_unbound_claim_comes_first():
    found = pod_waiting(pod(scheduled=UNSCHEDULABLE), {})
    assert found is not None and found.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in found.message
    refused = pod(scheduled=UNSCHEDULABLE, claim="static")
    found = pod_waiting(refused, {"static": pvc("static", "Pending")})
    assert found is not None and found.reason == "ClaimPending" and "PersistentVolumeClaim static" in found.message
    assert pod_waiting(refused, {"static": pvc("static", "Bound")}).reason == "Unschedulable"  # type: ignore[union-attr]
    # a claim being provisioned (or waiting for its first consumer) while the scheduler has refused nothing
    assert pod_waiting(pod(claim="static"), {"static": pvc("static", "Pending")}) is None
    # the driver reads the claims of refused pods that the run does not own
    assert unlisted_claims({"Pod": [refused], "PersistentVolumeClaim": []}) == ["static"]
    assert unlisted_claims({"Pod": [pod(claim="static")], "PersistentVolumeClaim": []}) == []


def test_running_finished_and_deleted_pods_do_not_wait():
    assert pod_waiting(pod(phase="Running"), {}) is None
    assert pod_waiting(pod(phase="Failed", waiting="ErrImagePull"), {}) is None
    gone = pod(waiting="ErrImagePull")
    gone["metadata"]["deletionTimestamp"] = "2026-12-02T03:00:00Z"
    assert pod_waiting(gone, {}) is None


# ---- the pure part: the reconciler -----------------------------------------------------------------------


def stick(s: Story, job: str, **status: Any) -> None:
    (p,) = [o for o in s.api.of_kind("Pod") if o["metadata"]["labels"].get("job-name") == job]
    p["status"] = status


def test_a_stalled_stage_is_in_the_message_a_condition_and_one_event():
    s = Story()
    s.reconcile()
    stick(s, "tiny-sft-1", phase="Pending", conditions=[UNSCHEDULABLE])
    d = s.reconcile()
    assert [e.reason for e in d.events] == ["Unschedulable"]
    stalled = cond(s.status, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "Unschedulable"
    assert s.status["message"].startswith("sft: pod tiny-sft-1-pod cannot be scheduled: 0/1 nodes")
    assert [e.reason for e in s.reconcile().events] == []  # not one per resync
    stick(
        s,
        "tiny-sft-1",
        phase="Pending",
        containerStatuses=[{"name": "sft", "state": {"waiting": {"reason": "ErrImagePull"}}}],
    )
    assert [e.reason for e in s.reconcile().events] == ["ImagePullError"]  # a new reason: a new event
    stick(s, "tiny-sft-1", phase="Running")
    s.reconcile()
    assert cond(s.status, "Stalled")["status"] == "False"
    assert s.status["message"] == "sft: running Job tiny-sft-1"
    stick(s, "tiny-sft-1", phase="Pending", conditions=[UNSCHEDULABLE])
    s.reconcile()
    s.api.edit_spec(suspend=True)
    s.reconcile()
    assert s.status["phase"] == "Suspended" and cond(s.status, "Stalled")["status"] == "False"


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ({"phase": "Pending", "conditions": [UNSCHEDULABLE]}, "Unschedulable"),
        ({"phase": "Pending", "conditions": [UNSCHEDULABLE], "claim": "Pending"}, "ClaimPending"),
        (
            {
                "phase": "Pending",
                "containerStatuses": [{"name": "sft", "state": {"waiting": {"reason": "ImagePullBackOff"}}}],
            },
            "ImagePullError",
        ),
        (
            {
                "phase": "Pending",
                "containerStatuses": [{"name": "sft", "state": {"waiting": {"reason": "CreateContainerConfigError"}}}],
            },
            "ContainerConfigError",
        ),
    ],
)
def test_each_waiting_state_gets_one_event_over_many_reconciles(status: dict, reason: str):
    s = Story()
    s.reconcile()
    claim = status.pop("claim", None)
    if claim:
        s.api.objects[("PersistentVolumeClaim", "ns", "tiny-workspace")]["status"] = {"phase": claim}
    stick(s, "tiny-sft-1", **status)
    reasons = [e.reason for _ in range(4) for e in s.reconcile().events]
    assert reasons == [reason]
    assert cond(s.status, "Stalled")["reason"] == reason and "pod tiny-sft-1-pod" in s.status["message"]


def test_a_missed_stage_deadline_fails_the_attempt_naming_the_field_and_is_retried():
    s = Story(retries=1, backoffSeconds=1)
    s.api.edit_spec(sft={"timeoutSeconds": 60})
    s.reconcile()
    job = s.api.get("Job", "ns", "tiny-sft-1")
    assert job["spec"]["activeDeadlineSeconds"] == 60
    stick(s, "tiny-sft-1", phase="Pending", conditions=[UNSCHEDULABLE])
    s.reconcile()
    # what the Job controller does at the deadline: pods deleted, the Job Failed (DeadlineExceeded)
    s.api.delete("Pod", "ns", "tiny-sft-1-pod")
    s.api.objects[("Job", "ns", "tiny-sft-1")]["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]
    }
    d = s.reconcile()
    sft = s.status["stages"]["sft"]
    assert sft["failures"] == 1 and "spec.sft.timeoutSeconds (60s)" in sft["message"]
    assert "it was stalled: sft: pod tiny-sft-1-pod cannot be scheduled" in sft["message"]
    assert "StageFailed" in [e.reason for e in d.events]
    s.reconcile(5)
    assert s.jobs() == ["tiny-sft-1", "tiny-sft-2"]


def refuse_pods(s: Story, job: str, message: str) -> None:
    """What the API server and the Job controller do when a quota refuses the Job's pod: no pod, a Warning
    FailedCreate Event on the Job, and a Job that keeps waiting."""
    s.api.delete("Pod", "ns", f"{job}-pod")
    uid = s.api.objects[("Job", "ns", job)]["metadata"]["uid"]
    s.api.objects[("Event", "ns", f"{job}.1")] = {
        "kind": "Event",
        "metadata": {"name": f"{job}.1", "namespace": "ns"},
        "involvedObject": {"kind": "Job", "name": job, "uid": uid},
        "reason": "FailedCreate",
        "type": "Warning",
        "message": message,
        "lastTimestamp": "2026-11-25T12:00:02Z",
    }


def test_a_job_whose_pods_are_refused_is_stalled_then_its_start_deadline_fails_the_attempt():
    s = Story(retries=0, startTimeoutSeconds=120)
    s.reconcile()
    s.api.objects[("Job", "ns", "tiny-sft-1")]["status"] = {"startTime": "2026-11-25T12:00:01Z"}
    refuse_pods(s, "tiny-sft-1", 'Error creating: pods "tiny-sft-1-x" is forbidden: exceeded quota: q, limited: pods=0')
    d = s.reconcile(5)  # too soon: a pod may be on its way, the Events are not read yet
    assert "Stalled" not in [c["type"] for c in s.status["conditions"]] and d.requeue_after == 5
    d = s.reconcile(6)
    stalled = cond(s.status, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "FailedCreate"
    assert "Job tiny-sft-1 cannot create its pods: Error creating" in stalled["message"]
    assert "exceeded quota: q, limited: pods=0" in s.status["message"]
    assert [e.reason for e in d.events] == ["FailedCreate"]
    assert s.status["phase"] == "Running" and 100 < d.requeue_after <= 110  # the start deadline is due then
    d = s.reconcile(110)
    assert [e.reason for e in d.events] == ["StageStartTimeout"] and s.api.names("Job") == []
    d = s.reconcile(1)
    assert s.status["phase"] == "Failed"
    sft = s.status["stages"]["sft"]
    assert "no pod of Job tiny-sft-1 ran within spec.startTimeoutSeconds (120s)" in sft["message"]
    assert "exceeded quota" in sft["message"]  # what it waited for


def test_a_running_stage_has_no_start_deadline():
    s = Story(startTimeoutSeconds=60)
    s.reconcile()
    stick(s, "tiny-sft-1", phase="Running")
    s.reconcile(3600)
    assert s.api.names("Job") == ["tiny-sft-1"] and s.status["stages"]["sft"]["failures"] == 0


def test_stalled_is_kept_while_the_stuck_pod_is_deleted_before_the_job_says_why():
    # a watch-fed view can show the deadline's pod deletion before the Job's FailureTarget: Stalled must
    # survive that round, or the failure could not name what the attempt waited for
    s = Story()
    s.reconcile()
    stick(s, "tiny-sft-1", phase="Pending", conditions=[UNSCHEDULABLE])
    s.reconcile()
    s.api.objects[("Pod", "ns", "tiny-sft-1-pod")]["metadata"]["deletionTimestamp"] = "2026-11-25T12:00:03Z"
    s.reconcile()
    assert cond(s.status, "Stalled")["status"] == "True"


def teacher_created_at(s: Story, when: str) -> None:
    s.api.objects[("Deployment", "ns", "tiny-teacher")]["metadata"]["creationTimestamp"] = when


def test_a_teacher_that_is_not_available_in_time_is_restarted_then_fails_the_run():
    s = Story(retries=1, backoffSeconds=1)
    s.api.edit_spec(teacher={"serving": {"readyTimeoutSeconds": 30}})
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400})
    s.reconcile()
    dep = s.api.get("Deployment", "ns", "tiny-teacher")
    assert dep["spec"]["progressDeadlineSeconds"] == 30
    teacher_created_at(s, "2026-11-25T12:00:02Z")
    assert s.reconcile(10).requeue_after == pytest.approx(30 - 10, abs=1.5)  # woken at the deadline
    d = s.reconcile(25)  # 35 s after creation
    assert "TeacherTimeout" in [e.reason for e in d.events]
    assert s.api.names("Deployment") == [] and s.status["stages"]["teacher"]["failures"] == 1
    assert "readyTimeoutSeconds 30" in s.status["stages"]["teacher"]["message"]
    assert s.jobs() == ["tiny-sft-1"]  # no learner without a teacher
    s.reconcile(5)  # after the back-off: attempt 2
    assert s.api.names("Deployment") == ["tiny-teacher"] and s.status["stages"]["teacher"]["attempts"] == 2
    # the Deployment controller's verdict counts as much as the operator's clock
    teacher_created_at(s, "2026-11-25T12:00:40Z")
    s.api.objects[("Deployment", "ns", "tiny-teacher")]["status"] = {
        "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    }
    s.reconcile()
    st = s.status
    assert st["phase"] == "Failed" and st["stages"]["teacher"]["phase"] == "Failed"
    assert cond(st, "Failed")["reason"] == "TeacherFailed" and "ProgressDeadlineExceeded" in st["message"]
    assert cond(st, "TeacherReady")["reason"] == "TeacherTimeout"
    assert s.api.names("Deployment") == [] and s.jobs() == ["tiny-sft-1"]
    s.reconcile(60)
    assert s.api.names("Deployment") == []  # final
    assert s.status["message"] == st["message"] and s.status["stage"] == "teacher"


def test_a_teacher_that_served_and_went_unready_is_timed_from_then():
    s = Story(backoffSeconds=5)
    s.api.edit_spec(teacher={"serving": {"readyTimeoutSeconds": 30}})
    s.to_distill()
    s.api.finish_job("tiny-distill-1", 1, {"stage": "distill", "error": "transient"})
    teacher_created_at(s, "2026-11-25T10:00:00Z")  # two hours before
    s.api.objects[("Deployment", "ns", "tiny-teacher")]["status"] = {
        "conditions": [{"type": "Available", "status": "False", "lastTransitionTime": "2026-11-25T12:00:05Z"}]
    }
    s.reconcile(1)
    assert s.api.names("Deployment") == ["tiny-teacher"] and s.status["stages"]["teacher"].get("failures", 0) == 0
    s.reconcile(40)
    assert s.api.names("Deployment") == [] and "not Available for" in s.status["stages"]["teacher"]["message"]


def test_a_teacher_whose_pods_cannot_be_created_says_why():
    s = Story()
    s.to_distill()
    s.api.finish_job("tiny-distill-1", 1, {"stage": "distill", "error": "transient"})
    quota = 'pods "tiny-teacher-x" is forbidden: exceeded quota: q, requested: pods=1, used: pods=0, limited: pods=0'
    s.api.objects[("Deployment", "ns", "tiny-teacher")]["status"] = {
        "conditions": [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": quota}]
    }
    d = s.reconcile()
    assert cond(s.status, "Stalled")["reason"] == "FailedCreate" and "FailedCreate" in [e.reason for e in d.events]
    assert s.status["message"] == f"teacher: Deployment tiny-teacher cannot create pods: FailedCreate: {quota}"


def test_a_spec_edit_while_only_the_teacher_runs_replaces_the_teacher_before_the_learner_starts():
    s = Story(retries=2, backoffSeconds=5)
    s.to_distill()
    old_hash = s.api.get("Deployment", "ns", "tiny-teacher")["metadata"]["annotations"]["opd.dev/spec-hash"]
    s.api.finish_job("tiny-distill-1", 1, {"stage": "distill", "error": "transient"})
    s.reconcile()
    assert s.status["stages"]["distill"]["phase"] == "Retrying"
    s.api.edit_spec(distill={"steps": 7})
    d = s.reconcile()
    assert cond(s.status, "SpecAccepted")["status"] == "True"
    assert "steps: 7" in s.api.get("ConfigMap", "ns", "tiny-spec")["data"]["run.yaml"]
    assert s.api.names("Deployment") == [] and "TeacherRestarted" in [e.reason for e in d.events]
    s.reconcile(10)  # back-off over: the new teacher, but no learner until it is Available
    dep = s.api.get("Deployment", "ns", "tiny-teacher")
    new_hash = dep["metadata"]["annotations"]["opd.dev/spec-hash"]
    assert new_hash != old_hash and dep["spec"]["template"]["metadata"]["annotations"]["opd.dev/spec-hash"] == new_hash
    assert s.jobs() == ["tiny-distill-1", "tiny-sft-1"]
    s.api.make_available("tiny-teacher")
    s.reconcile()
    job = s.api.get("Job", "ns", "tiny-distill-2")
    assert job["metadata"]["annotations"]["opd.dev/spec-hash"] == new_hash


def test_the_deadlines_are_set_on_the_objects():
    obj = tiny_run()
    obj["spec"]["eval"]["timeoutSeconds"] = 900
    run = parse_run(obj)
    assert children.stage_job(obj, run, "eval", 1)["spec"]["activeDeadlineSeconds"] == 900
    assert "activeDeadlineSeconds" not in children.stage_job(obj, run, "sft", 1)["spec"]
    assert children.teacher_deployment(obj, run)["spec"]["progressDeadlineSeconds"] == 1800  # the default


# ---- on the real control plane ---------------------------------------------------------------------------


def stalled(run: Run, reason: str) -> dict:
    return run.wait(
        f"Stalled={reason}",
        lambda st: any(
            c["type"] == "Stalled" and c["status"] == "True" and c["reason"] == reason for c in st.get("conditions", [])
        ),
    )


def test_an_unschedulable_stage_is_reported_then_its_deadline_fails_it(cp: ControlPlane, ns: str, operator: Operator):
    doc = tiny_math("no-gpus", retries=1, backoffSeconds=1)
    doc["spec"]["sft"]["resources"] = {"gpus": 16}  # the only node has 8
    doc["spec"]["sft"]["timeoutSeconds"] = 6
    run = Run(cp, ns, doc)
    st = stalled(run, "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in st["message"] and st["message"].startswith("sft: pod no-gpus-sft-1-")
    assert run.get_dr()["PHASE"] == "Running"
    st = run.wait("attempt 2", lambda st: st.get("stages", {}).get("sft", {}).get("attempts") == 2, timeout=TIMEOUT)
    assert "spec.sft.timeoutSeconds (6s)" in st["stages"]["sft"]["message"]
    assert "Insufficient nvidia.com/gpu" in st["stages"]["sft"]["message"]  # what it was waiting for
    st = run.wait("Failed", lambda st: st.get("phase") == "Failed", timeout=TIMEOUT)
    assert st["stages"]["sft"]["failures"] == 2 and "RetriesExhausted" in st["message"]
    assert count_events(cp, ns, run.name, "Unschedulable", 2) == 2  # one per attempt, not one per resync


def test_a_stage_whose_pods_a_quota_refuses_is_stalled_with_the_api_servers_reason(
    cp: ControlPlane, ns: str, operator: Operator
):
    cp.apply(
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}},
        namespace=ns,
    )
    run = Run(cp, ns, tiny_math("refused"))
    st = stalled(run, "FailedCreate")
    assert "Job refused-sft-1 cannot create its pods" in st["message"] and "exceeded quota: no-pods" in st["message"]
    assert st["phase"] == "Running" and count_events(cp, ns, run.name, "FailedCreate") == 1
    cp.kubectl("delete", "resourcequota", "no-pods", "-n", ns)
    run.wait(
        "Stalled=False once its pod runs",
        lambda st: any(c["type"] == "Stalled" and c["status"] == "False" for c in st.get("conditions", [])),
        timeout=TIMEOUT,
    )


def test_an_unbound_workspace_claim_is_reported(cp: ControlPlane, ns: str, operator: Operator):
    cp.apply(
        {  # static binding only, and no PersistentVolume: never bound
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "static"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
        namespace=ns,
    )
    run = Run(cp, ns, tiny_math("unbound", workspace={"existingClaim": "static"}))
    st = stalled(run, "ClaimPending")
    assert "pod unbound-sft-1-" in st["message"] and "PersistentVolumeClaim static, which is Pending" in st["message"]
    assert run.condition("Stalled")["message"] == st["message"]
    assert count_events(cp, ns, run.name, "ClaimPending") == 1


def test_image_pull_and_config_errors_are_reported_once_each(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math("held", image=HELD_IMAGE))
    run.wait("the sft stage", lambda st: st.get("stage") == "sft")
    p = cp.wait_for_pod(ns, "job-name=held-sft-1", lambda p: bool(p["spec"].get("nodeName")), "scheduled")
    name = p["metadata"]["name"]
    cp.set_pod_waiting(ns, name, "ErrImagePull", f'failed to pull image "{HELD_IMAGE}": not found')
    st = stalled(run, "ImagePullError")
    assert f"pod {name} container sft: ErrImagePull" in st["message"]
    cp.set_pod_waiting(ns, name, "ImagePullBackOff", "Back-off pulling image")
    run.wait("ImagePullBackOff seen", lambda st: "ImagePullBackOff" in st.get("message", ""))
    cp.set_pod_waiting(ns, name, "CreateContainerConfigError", 'secret "hf-token" not found')
    st = stalled(run, "ContainerConfigError")
    assert 'secret "hf-token" not found' in st["message"]
    assert count_events(cp, ns, run.name, "ImagePullError") == 1  # ErrImagePull -> BackOff: the same state
    assert count_events(cp, ns, run.name, "ContainerConfigError") == 1


def distill_only(name: str, **spec: Any) -> dict:
    doc = tiny_math(name, **spec)
    doc["spec"]["sft"]["enabled"] = False
    doc["spec"]["eval"]["targets"] = ["student", "distill"]
    return doc


def test_a_teacher_never_available_is_retried_then_fails_the_run(cp: ControlPlane, ns: str, operator: Operator):
    doc = distill_only("slow-teacher", retries=1, backoffSeconds=1)
    doc["spec"]["teacher"]["serving"].update(readyTimeoutSeconds=4, resources={"gpus": 16})
    run = Run(cp, ns, doc)
    st = stalled(run, "Unschedulable")
    assert st["message"].startswith("teacher: pod slow-teacher-teacher-")
    st = run.wait("Failed", lambda st: st.get("phase") == "Failed", timeout=TIMEOUT)
    teacher = st["stages"]["teacher"]
    assert teacher["phase"] == "Failed" and teacher["failures"] == 2 and teacher["attempts"] == 2
    assert "readyTimeoutSeconds 4" in st["message"]
    assert run.condition("TeacherReady")["reason"] == "TeacherTimeout"
    assert count_events(cp, ns, run.name, "TeacherTimeout", 2) == 2
    assert run.jobs() == []  # no learner ever started
    cp.wait(
        "the teacher to be removed",
        lambda: not exists(cp, f"/apis/apps/v1/namespaces/{ns}/deployments/slow-teacher-teacher"),
        timeout=TIMEOUT,
    )


def test_a_spec_edit_between_distill_attempts_restarts_the_teacher_with_it(
    cp: ControlPlane, ns: str, operator: Operator
):
    run = Run(cp, ns, distill_only("edit", retries=2, backoffSeconds=8))
    run.wait("distill running", lambda st: (st.get("stages", {}).get("distill") or {}).get("phase") == "Running")
    path = f"/apis/apps/v1/namespaces/{ns}/deployments/edit-teacher"
    first = cp.get(path)["metadata"]
    run.finish("edit-distill-1", 1, {"stage": "distill", "error": "RuntimeError: transient"})
    run.wait("Retrying", lambda st: st.get("stages", {}).get("distill", {}).get("phase") == "Retrying")
    cp.kubectl("patch", "dr", run.name, "-n", ns, "--type=merge", "-p", '{"spec": {"distill": {"steps": 7}}}')
    run.wait("distill attempt 2", lambda st: st.get("stages", {}).get("distill", {}).get("attempts") == 2)
    second = cp.get(path)["metadata"]
    job = cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/edit-distill-2")["metadata"]
    assert second["uid"] != first["uid"]  # a new teacher ...
    assert second["annotations"]["opd.dev/spec-hash"] == job["annotations"]["opd.dev/spec-hash"]  # ... on the spec
    assert second["annotations"]["opd.dev/spec-hash"] != first["annotations"]["opd.dev/spec-hash"]
    assert run.condition("SpecAccepted")["status"] == "True"
    assert "steps: 7" in cp.get(f"/api/v1/namespaces/{ns}/configmaps/edit-spec")["data"]["run.yaml"]
    assert "TeacherRestarted" in run.events()


def test_a_teacher_refused_by_a_quota_says_so(cp: ControlPlane, ns: str, operator: Operator):
    cp.apply(
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}},
        namespace=ns,
    )
    run = Run(cp, ns, distill_only("quota"))
    st = stalled(run, "FailedCreate")
    assert st["message"].startswith("teacher: Deployment quota-teacher cannot create pods:")
    assert "exceeded quota: no-pods" in st["message"]
    assert count_events(cp, ns, run.name, "FailedCreate") == 1
