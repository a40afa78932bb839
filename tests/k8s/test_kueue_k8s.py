"""Kueue (``spec.queueName``) and disruptions: the queue label on every stage Job and the teacher, Jobs created
suspended and never unsuspended by the operator, the run showing Queued / Admitted / Evicted, and pods the
cluster disrupts (condition DisruptionTarget) replaced by the Job's podFailurePolicy without using a retry.

The pure tests play the reconciler against FakeApi. The ``k8s`` tests run the operator on the real control
plane (kube-apiserver, the Job controller, the scheduler, kwok). Kueue itself is not installed: its
controller and webhooks are not built here. The test plays Kueue's part through the API server as Kueue
does it: it unsuspends a labelled Job to admit it and suspends it again to evict it (the real Job
controller then deletes the pods, clears status.startTime and does not fail the Job). A disruption is
written the way the scheduler's preemption or the eviction API leaves a pod: condition DisruptionTarget=True
and phase Failed, through the pod's status subresource; the real Job controller applies the podFailurePolicy.
Kueue's pod webhook, which holds a teacher pod with the scheduling gate ``kueue.x-k8s.io/admission`` until
Kueue admits it, is a MutatingAdmissionPolicy of the real API server (fixture ``kueue_pod_gate``); the test
admits the pod by removing the gate, as Kueue does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from opd_operator import children, names
from opd_operator.observe import job_view, pod_waiting
from opd_runtime.spec import SpecError, parse_run

from support.controlplane import ControlPlane
from support.opd_fake_cluster import Story, cond, tiny_run
from support.operator_harness import TIMEOUT, Operator, Run, count_events, events_of, gang, sft_only, tiny_math

QUEUE = "team-a"


def reasons(decision: Any) -> list[str]:
    return [e.reason for e in decision.events]


# ---- the manifests ----------------------------------------------------------------------------------------


def test_without_a_queue_jobs_start_at_once_and_carry_no_kueue_label():
    obj = tiny_run()
    run = parse_run(obj)
    for stage in ("sft", "distill", "eval"):
        job = children.stage_job(obj, run, stage, 1)
        assert "suspend" not in job["spec"] and names.KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    dep = children.teacher_deployment(obj, run)
    assert names.KUEUE_QUEUE_LABEL not in dep["metadata"]["labels"]
    assert names.KUEUE_QUEUE_LABEL not in dep["spec"]["template"]["metadata"]["labels"]


def test_with_a_queue_every_job_is_labelled_and_suspended_and_the_teacher_labelled():
    obj = tiny_run(queueName=QUEUE)
    obj["spec"]["teacher"]["serving"]["queueName"] = "serving"
    run = parse_run(obj)
    for stage in ("sft", "distill", "eval"):
        job = children.stage_job(obj, run, stage, 1)
        assert job["spec"]["suspend"] is True and job["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == QUEUE
    dep = children.teacher_deployment(obj, run)
    assert dep["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "serving"  # its own queue wins
    assert dep["spec"]["template"]["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "serving"
    del obj["spec"]["teacher"]["serving"]["queueName"]
    dep = children.teacher_deployment(obj, parse_run(obj))
    assert dep["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == QUEUE
    # which queue admits a stage is not what it computes: no new spec hash, so no refused edit or new teacher
    assert children.spec_hash(parse_run(obj)) == children.spec_hash(parse_run(tiny_run()))


def test_every_job_ignores_disruptions_and_fails_at_once_on_a_bad_configuration():
    obj = tiny_run()
    run = parse_run(obj)
    for stage in ("sft", "distill", "eval"):
        spec = children.stage_job(obj, run, stage, 1)["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
        ignore, fail = spec["podFailurePolicy"]["rules"]
        assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        assert fail["action"] == "FailJob" and fail["onExitCodes"]["values"] == [2]
        assert fail["onExitCodes"]["containerName"] == stage


@pytest.mark.parametrize("bad", ["Team-A", "-a", "a" * 64, "a_b"])
def test_a_bad_queue_name_is_refused_naming_the_field(bad: str):
    with pytest.raises(SpecError, match=r"spec\.queueName"):
        parse_run(tiny_run(queueName=bad))
    obj = tiny_run()
    obj["spec"]["teacher"]["serving"]["queueName"] = bad
    with pytest.raises(SpecError, match=r"spec\.teacher\.serving\.queueName"):
        parse_run(obj)


# ---- the reconciler ----------------------------------------------------------------------------------------


def test_a_queued_job_is_shown_queued_then_admitted_then_evicted_and_readmitted_without_a_failure():
    s = Story(queueName=QUEUE)
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1"] and s.api.names("Pod") == []  # suspended: no pod before admission
    d = s.reconcile()
    sft = s.status["stages"]["sft"]
    assert sft["phase"] == "Waiting" and sft["queue"] == "Queued"
    assert reasons(d) == ["Queued"]
    assert s.status["message"] == "sft: Job tiny-sft-1 is queued in Kueue LocalQueue team-a, waiting for admission"
    admitted = cond(s.status, "Admitted")
    assert admitted["status"] == "False" and admitted["reason"] == "Queued"
    assert cond(s.status, "SftSucceeded")["reason"] == "Queued"
    assert "Stalled" not in [c["type"] for c in s.status["conditions"]]  # waiting its turn is no fault
    assert reasons(s.reconcile()) == []  # one event, not one per resync

    s.api.set_suspend("tiny-sft-1", False)  # Kueue admits it
    d = s.reconcile()
    assert reasons(d) == ["Admitted"] and s.status["stages"]["sft"]["phase"] == "Running"
    assert cond(s.status, "Admitted")["status"] == "True" and s.status["message"] == "sft: running Job tiny-sft-1"

    s.api.set_suspend("tiny-sft-1", True)  # Kueue preempts it: the Job controller deletes the pod
    d = s.reconcile()
    sft = s.status["stages"]["sft"]
    assert reasons(d) == ["Evicted"] and [e.type for e in d.events] == ["Warning"]
    assert sft["queue"] == "Evicted" and sft["evictions"] == 1 and sft["failures"] == 0
    assert cond(s.status, "Admitted")["reason"] == "Evicted" and "evicted by Kueue" in s.status["message"]
    assert reasons(s.reconcile()) == [] and s.jobs() == ["tiny-sft-1"]  # no new attempt: Kueue readmits it

    s.api.set_suspend("tiny-sft-1", False)
    assert reasons(s.reconcile()) == ["Admitted"]
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400})
    s.reconcile()
    sft = s.status["stages"]["sft"]
    assert sft["phase"] == "Succeeded" and sft["attempts"] == 1 and sft["failures"] == 0 and sft["evictions"] == 1
    # the operator never wrote Job.spec.suspend: only create calls for Jobs
    assert [c for c in s.api.calls if c[1] == "Job" and c[0] != "create"] == []


def test_without_a_queue_there_is_no_admission_state():
    s = Story()
    s.reconcile()
    d = s.reconcile()
    assert s.status["stages"]["sft"]["phase"] == "Running" and "queue" not in s.status["stages"]["sft"]
    assert "Admitted" not in [c["type"] for c in s.status["conditions"]] and reasons(d) == []


def test_a_job_suspended_by_another_controller_without_a_queue_name_waits_and_says_so():
    # e.g. Kueue with manageJobsWithoutQueueName: its webhook suspends every new Job in the namespace
    s = Story()
    s.reconcile()
    s.api.set_suspend("tiny-sft-1", True)
    d = s.reconcile()
    assert reasons(d) == ["Queued"] and s.status["stages"]["sft"]["phase"] == "Waiting"
    assert "suspended, waiting to be admitted (spec.queueName is empty" in s.status["message"]
    s.api.set_suspend("tiny-sft-1", False)
    assert reasons(s.reconcile()) == ["Admitted"] and s.status["message"] == "sft: running Job tiny-sft-1"


def test_suspending_a_queued_run_deletes_its_job_and_resuming_queues_a_new_attempt():
    s = Story(queueName=QUEUE)
    s.reconcile()
    s.reconcile()
    s.api.edit_spec(suspend=True)
    s.reconcile()
    assert s.jobs() == [] and s.status["phase"] == "Suspended" and "queue" not in s.status["stages"]["sft"]
    s.api.edit_spec(suspend=False)
    s.reconcile()
    assert s.jobs() == ["tiny-sft-2"] and s.api.get("Job", "ns", "tiny-sft-2")["spec"]["suspend"] is True
    s.reconcile()
    assert s.status["stages"]["sft"]["queue"] == "Queued" and s.status["stages"]["sft"]["failures"] == 0


def test_a_queue_name_edit_is_no_spec_change_for_a_running_stage():
    s = Story(queueName=QUEUE)
    s.reconcile()
    s.api.set_suspend("tiny-sft-1", False)
    s.reconcile()
    s.api.edit_spec(queueName="team-b")
    s.reconcile()
    assert cond(s.status, "SpecAccepted")["status"] == "True"
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400})
    s.reconcile()
    s.api.make_available("tiny-teacher")
    s.reconcile()
    assert s.api.get("Job", "ns", "tiny-distill-1")["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "team-b"


def test_an_edit_while_the_stage_is_queued_is_refused_saying_it_is_queued():
    s = Story(queueName=QUEUE)
    s.reconcile()
    s.reconcile()
    s.api.edit_spec(sft={"steps": 7})
    s.reconcile()
    refused = cond(s.status, "SpecAccepted")
    assert (
        refused["status"] == "False"
        and "sft stage waits in its queue (Job tiny-sft-1 is suspended)" in refused["message"]
    )
    s.api.edit_spec(suspend=True)  # the documented way: suspend and resume, a new Job with the new spec
    s.reconcile()
    s.api.edit_spec(suspend=False)
    s.reconcile()
    assert s.jobs() == ["tiny-sft-2"] and cond(s.status, "SpecAccepted")["status"] == "True"
    assert "steps: 7" in s.api.get("ConfigMap", "ns", "tiny-spec")["data"]["run.yaml"]


def gated_teacher_pod(s: Story, *, gated: bool) -> None:
    """What Kueue's pod integration does to a teacher pod: a scheduling gate until it admits the pod."""
    labels = {**names.labels("tiny", "teacher"), names.KUEUE_QUEUE_LABEL: QUEUE}
    spec: dict[str, Any] = {"schedulingGates": [{"name": names.KUEUE_ADMISSION_GATE}]} if gated else {}
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
    s.api.objects[("Pod", "ns", "tiny-teacher-x")] = {
        "metadata": {"name": "tiny-teacher-x", "namespace": "ns", "labels": labels},
        "spec": spec,
        "status": {"phase": "Pending", "conditions": [scheduled] if gated else []},
    }


def test_a_queued_teacher_is_not_stalled_and_its_ready_clock_starts_at_admission():
    s = Story(queueName=QUEUE, backoffSeconds=1)
    s.api.edit_spec(teacher={"serving": {"readyTimeoutSeconds": 30}})
    s.reconcile()
    s.api.set_suspend("tiny-sft-1", False)
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400})
    s.reconcile()
    assert s.api.get("Deployment", "ns", "tiny-teacher")["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == QUEUE
    s.api.objects[("Deployment", "ns", "tiny-teacher")]["metadata"]["creationTimestamp"] = "2026-11-25T12:00:03Z"
    gated_teacher_pod(s, gated=True)
    d = s.reconcile()
    assert reasons(d) == ["Queued"] and s.status["stages"]["teacher"]["queue"] == "Queued"
    assert cond(s.status, "Admitted")["reason"] == "Queued" and "Stalled" not in [
        c["type"] for c in s.status["conditions"]
    ]
    d = s.reconcile(120)  # far past readyTimeoutSeconds, all of it queued
    assert reasons(d) == [] and s.status["stages"]["teacher"].get("failures", 0) == 0
    assert s.api.names("Deployment") == ["tiny-teacher"] and s.jobs() == ["tiny-sft-1"]
    gated_teacher_pod(s, gated=False)  # admitted: the gate is gone, the pod loads the model
    d = s.reconcile(1)
    assert reasons(d) == ["Admitted"] and cond(s.status, "Admitted")["status"] == "True"
    s.reconcile(20)  # 21 s after admission: still inside the 30 s budget
    assert s.status["stages"]["teacher"].get("failures", 0) == 0
    gated_teacher_pod(s, gated=True)  # Kueue preempted the pod; the ReplicaSet's new one is gated again
    d = s.reconcile(1)
    assert reasons(d) == ["Evicted"] and s.status["stages"]["teacher"]["evictions"] == 1
    assert cond(s.status, "Admitted")["reason"] == "Evicted"
    s.reconcile(60)
    assert s.status["stages"]["teacher"].get("failures", 0) == 0
    gated_teacher_pod(s, gated=False)
    assert reasons(s.reconcile(1)) == ["Admitted"]
    d = s.reconcile(31)  # 31 s after the second admission
    assert "TeacherTimeout" in reasons(d)


def test_a_gated_pod_reads_as_queued_not_as_a_scheduling_failure():
    pod = {
        "metadata": {"name": "p", "labels": {names.KUEUE_QUEUE_LABEL: QUEUE}},
        "spec": {"schedulingGates": [{"name": names.KUEUE_ADMISSION_GATE}]},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}],
        },
    }
    found = pod_waiting(pod, {})
    assert found is not None and found.reason == "Queued" and "LocalQueue team-a" in found.message
    pod["spec"]["schedulingGates"] = [{"name": "example.com/other"}]
    assert pod_waiting(pod, {}).reason == "SchedulingGated"  # type: ignore[union-attr]  # someone else's gate


def disrupt(pod: dict, code: int = 137) -> None:
    pod["status"] = {
        "phase": "Failed",
        "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
        "containerStatuses": [
            {
                "name": "sft",
                "state": {"terminated": {"exitCode": code, "reason": "Error", "finishedAt": "2026-11-25T12:00:01Z"}},
            }
        ],
    }


def test_a_disrupted_pod_is_reported_and_neither_its_exit_nor_the_attempt_counts_as_a_failure():
    s = Story(retries=0)
    s.reconcile()
    disrupt(s.api.objects[("Pod", "ns", "tiny-sft-1-pod")])
    replacement = dict(s.api.objects[("Pod", "ns", "tiny-sft-1-pod")], status={"phase": "Running"})
    replacement["metadata"] = dict(replacement["metadata"], name="tiny-sft-1-pod2")
    s.api.objects[("Pod", "ns", "tiny-sft-1-pod2")] = replacement  # the Job controller's replacement
    d = s.reconcile()
    sft = s.status["stages"]["sft"]
    assert reasons(d) == ["PodDisrupted"] and sft["disruptions"] == 1
    assert sft["disruptedPods"] == ["tiny-sft-1-pod (PreemptionByScheduler)"] and sft["failures"] == 0
    assert reasons(s.reconcile()) == []  # once
    # the attempt's result is the replacement's, not the disrupted pod's exit 137
    replacement["status"] = {
        "phase": "Succeeded",
        "containerStatuses": [{"name": "sft", "state": {"terminated": {"exitCode": 0, "message": '{"step": 400}'}}}],
    }
    s.api.objects[("Job", "ns", "tiny-sft-1")]["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    s.reconcile()
    sft = s.status["stages"]["sft"]
    assert sft["phase"] == "Succeeded" and sft["step"] == 400 and sft["failures"] == 0
    job = job_view(s.api.get("Job", "ns", "tiny-sft-1"), s.api.of_kind("Pod"))
    assert job is not None and job.termination is not None and job.termination.exit_code == 0


def test_a_gang_broken_by_a_disruption_starts_again_at_once_without_using_a_retry():
    s = Story(retries=0, backoffSeconds=60, workspace={"size": "2Gi", "accessModes": ["ReadWriteMany"]})
    s.api.edit_spec(sft={"resources": {"gpus": 4, "nodes": 2}})
    s.reconcile()
    job = s.api.objects[("Job", "ns", "tiny-sft-1")]
    assert job["spec"]["podFailurePolicy"]["rules"][0]["action"] == "FailJob"  # no lone pod rejoins a gang
    disrupt(s.api.objects[("Pod", "ns", "tiny-sft-1-pod")])
    why = "Pod ns/tiny-sft-1-pod has condition DisruptionTarget matching FailJob rule at index 0"
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": why}]}
    d = s.reconcile()
    sft = s.status["stages"]["sft"]
    assert s.jobs() == ["tiny-sft-1", "tiny-sft-2"] and sft["failures"] == 0 and s.status["phase"] == "Running"
    assert "PodDisrupted" in reasons(d) and sft["disruptions"] == 1
    # a gang that fails on its own after a disruption elsewhere is a failure: exit 2 is never excused
    disrupt(s.api.objects[("Pod", "ns", "tiny-sft-2-pod")])
    s.api.objects[("Pod", "ns", "tiny-sft-2-pod2")] = {
        "metadata": {
            "name": "tiny-sft-2-pod2",
            "namespace": "ns",
            "labels": {**names.labels("tiny", "sft"), "job-name": "tiny-sft-2"},
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "sft", "state": {"terminated": {"exitCode": 2, "message": "bad"}}}],
        },
    }
    s.api.objects[("Job", "ns", "tiny-sft-2")]["status"] = job["status"]
    s.reconcile()
    assert s.status["phase"] == "Failed" and s.status["stages"]["sft"]["failures"] == 1


# ---- on the real control plane ------------------------------------------------------------------------------


def set_suspend(cp: ControlPlane, ns: str, job: str, suspend: bool) -> None:
    """Kueue's part: unsuspend a Job it admits, suspend it again when it evicts it."""
    cp.request(
        "PATCH",
        f"/apis/batch/v1/namespaces/{ns}/jobs/{job}",
        {"spec": {"suspend": suspend}},
        content_type="application/merge-patch+json",
    )


def stage_is(run: Run, stage: str, **fields: Any) -> dict:
    return run.wait(
        f"{stage} {fields}",
        lambda st: all((st.get("stages", {}).get(stage) or {}).get(k) == v for k, v in fields.items()),
    )


def test_kueue_admission_and_eviction_on_the_real_job_controller(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math("queued", queueName=QUEUE, retries=0))
    st = stage_is(run, "sft", queue="Queued", phase="Waiting")
    job = cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/queued-sft-1")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == QUEUE
    assert st["message"].startswith("sft: Job queued-sft-1 is queued in Kueue LocalQueue team-a")
    assert run.condition("Admitted")["reason"] == "Queued"
    time.sleep(2)
    assert cp.pods(ns, "job-name=queued-sft-1") == []  # nothing runs before admission

    set_suspend(cp, ns, "queued-sft-1", False)
    stage_is(run, "sft", queue="Admitted", phase="Running")
    run.running_pod("queued-sft-1")
    assert run.condition("Admitted")["status"] == "True"

    set_suspend(cp, ns, "queued-sft-1", True)  # preemption: the Job controller deletes the pod
    st = stage_is(run, "sft", queue="Evicted", evictions=1)
    assert st["stages"]["sft"]["failures"] == 0 and "evicted by Kueue" in st["message"]
    cp.wait("the evicted pod to go", lambda: not cp.pods(ns, "job-name=queued-sft-1"), timeout=TIMEOUT)
    job = cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/queued-sft-1")
    assert not job["status"].get("failed") and "startTime" not in job["status"]  # the Job did not fail

    set_suspend(cp, ns, "queued-sft-1", False)
    stage_is(run, "sft", queue="Admitted", phase="Running")
    run.finish("queued-sft-1", 0, {"stage": "sft", "step": 400, "checkpoint": "/workspace/checkpoints/sft/final"})
    st = stage_is(run, "sft", phase="Succeeded")
    sft = st["stages"]["sft"]
    assert sft["attempts"] == 1 and sft["failures"] == 0 and sft["evictions"] == 1
    assert [j for j in run.jobs() if "-sft-" in j] == ["queued-sft-1"]  # retries 0, and nothing was retried
    # the next stage queues too, and the teacher carries the label Kueue's Deployment integration reads
    stage_is(run, "distill", queue="Queued")
    assert cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/queued-distill-1")["spec"]["suspend"] is True
    teacher = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/queued-teacher")
    assert teacher["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == QUEUE
    assert count_events(cp, ns, run.name, "Evicted") == 1
    count_events(cp, ns, run.name, "Admitted", 3)
    admitted = sorted(e["message"].split(":")[0] for e in events_of(cp, ns, run.name, "Admitted"))
    assert admitted == ["sft", "sft", "teacher"]  # no Kueue here to gate the teacher's pod: it runs at once


def disrupt_on_cluster(cp: ControlPlane, ns: str, first: dict) -> None:
    """What the scheduler's preemption (or the eviction API, a drain) leaves of a running pod: condition
    DisruptionTarget=True, the container killed (137), phase Failed; written through the status subresource."""
    name = first["metadata"]["name"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    container = first["spec"]["containers"][0]
    status = {
        "phase": "Failed",
        "conditions": [
            *first["status"]["conditions"],
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "PreemptionByScheduler",
                "message": "preempted by a higher-priority pod",
                "lastTransitionTime": now,
            },
        ],
        "containerStatuses": [
            {
                "name": container["name"],
                "image": container["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": now, "finishedAt": now}},
            }
        ],
    }
    cp.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/{name}/status",
        {"status": status},
        content_type="application/strategic-merge-patch+json",
    )


def test_a_disrupted_pod_is_replaced_without_using_a_retry(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math("disrupted", retries=0))
    first = run.running_pod("disrupted-sft-1")
    name = first["metadata"]["name"]
    disrupt_on_cluster(cp, ns, first)
    st = stage_is(run, "sft", disruptions=1)
    assert st["stages"]["sft"]["disruptedPods"] == [f"{name} (PreemptionByScheduler)"]
    replacement = cp.wait_for_pod(
        ns,
        "job-name=disrupted-sft-1",
        lambda p: p["metadata"]["name"] != name and p["status"].get("phase") == "Running",
        "the Job controller's replacement",
        timeout=TIMEOUT,
    )
    cp.set_pod_exit(ns, replacement["metadata"]["name"], 0, '{"stage": "sft", "step": 400}')
    st = stage_is(run, "sft", phase="Succeeded")
    assert st["stages"]["sft"]["failures"] == 0 and st["stages"]["sft"]["step"] == 400
    assert [j for j in run.jobs() if "-sft-" in j] == ["disrupted-sft-1"]  # the same attempt finished it
    assert count_events(cp, ns, run.name, "PodDisrupted") == 1


def test_a_gang_broken_by_a_disruption_is_restarted_whole_without_using_a_retry(
    cp: ControlPlane, ns: str, operator: Operator, gpu_nodes: dict
):
    doc = sft_only("gang", {"resources": {"gpus": 4, "nodes": 2}}, retries=0, backoffSeconds=60, **gpu_nodes)
    run = Run(cp, ns, doc)
    run.wait("the sft Job", lambda st: (st.get("stages", {}).get("sft") or {}).get("job") == "gang-sft-1")
    pods = gang(cp, ns, "gang-sft-1")
    disrupt_on_cluster(cp, ns, pods[1])  # one node drained: the Job controller fails the gang (FailJob)
    st = run.wait("the second gang", lambda st: st["stages"]["sft"].get("job") == "gang-sft-2")
    job = cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/gang-sft-1")
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy" and "DisruptionTarget" in failed["message"]
    sft = st["stages"]["sft"]
    assert sft["failures"] == 0 and sft["disruptions"] == 1 and st["phase"] == "Running"  # retries 0: none used
    retry = gang(cp, ns, "gang-sft-2")  # at once, not after backoffSeconds
    assert all("--resume" in p["spec"]["containers"][0]["command"] for p in retry)


@pytest.fixture
def kueue_pod_gate(cp: ControlPlane, ns: str) -> Iterator[None]:
    """Kueue's pod webhook, as a MutatingAdmissionPolicy of the real API server: a pod created in ``ns`` with
    the queue label gets the scheduling gate ``kueue.x-k8s.io/admission`` (Kueue removes it on admission).
    Yields once the API server applies it (a server-side dry-run pod comes back gated)."""
    name = f"kueue-pod-gate-{ns}"[:63]
    gate = names.KUEUE_ADMISSION_GATE
    cp.apply(
        [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingAdmissionPolicy",
                "metadata": {"name": name},
                "spec": {
                    "matchConstraints": {
                        "resourceRules": [
                            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
                        ],
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                    },
                    "matchConditions": [
                        {
                            "name": "queued",
                            "expression": f"has(object.metadata.labels) && '{names.KUEUE_QUEUE_LABEL}' in "
                            "object.metadata.labels",
                        }
                    ],
                    "failurePolicy": "Fail",
                    "reinvocationPolicy": "Never",
                    "mutations": [
                        {
                            "patchType": "ApplyConfiguration",
                            "applyConfiguration": {
                                "expression": "Object{spec: Object.spec{schedulingGates: "
                                f'[Object.spec.schedulingGates{{name: "{gate}"}}]}}}}'
                            },
                        }
                    ],
                },
            },
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingAdmissionPolicyBinding",
                "metadata": {"name": name},
                "spec": {"policyName": name},
            },
        ]
    )
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "gate-probe", "labels": {names.KUEUE_QUEUE_LABEL: QUEUE}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "c",
                    "image": "registry.invalid/probe",
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
    }

    def gated() -> bool:
        made = cp.request("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", probe)
        return gate in [g["name"] for g in made["spec"].get("schedulingGates") or []]

    cp.wait("the pod gate policy to be in force", gated, timeout=TIMEOUT)
    yield
    for kind in ("mutatingadmissionpolicybindings", "mutatingadmissionpolicies"):
        cp.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/{kind}/{name}", ok=(200, 202, 404))


def test_a_teacher_held_by_kueues_pod_gate_is_queued_not_stalled_and_not_timed_out(
    cp: ControlPlane, ns: str, operator: Operator, kueue_pod_gate: None
):
    doc = tiny_math("gated", queueName=QUEUE)
    doc["spec"]["sft"]["enabled"] = False
    doc["spec"]["eval"]["targets"] = ["student", "distill"]
    doc["spec"]["teacher"]["serving"]["readyTimeoutSeconds"] = 3
    run = Run(cp, ns, doc)
    st = stage_is(run, "teacher", queue="Queued")
    pod = cp.wait_for_pod(ns, "opd.dev/stage=teacher", lambda p: True, "created")
    scheduled = next(c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled")
    assert scheduled["reason"] == "SchedulingGated"  # the real scheduler's verdict on the gated pod
    assert st["message"] == f"teacher: pod {pod['metadata']['name']} waits for admission by Kueue (LocalQueue team-a)"
    assert run.condition("Admitted")["reason"] == "Queued"
    time.sleep(5)  # past readyTimeoutSeconds (3 s), every second of it queued: no TeacherTimeout
    st = run.status()
    assert st["stages"]["teacher"].get("failures", 0) == 0 and st["stages"]["teacher"]["attempts"] == 1
    assert not [c for c in st["conditions"] if c["type"] == "Stalled" and c["status"] == "True"]
    assert run.jobs() == []  # no learner before its teacher
    # Kueue admits the pod: it removes the gate; the scheduler places it, kwok runs it, the Deployment is Available
    cp.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}",
        [{"op": "remove", "path": "/spec/schedulingGates"}],
        content_type="application/json-patch+json",
    )
    stage_is(run, "teacher", queue="Admitted", phase="Running")
    st = stage_is(run, "distill", queue="Queued")  # the learner's Job queues in turn
    assert st["stages"]["teacher"].get("failures", 0) == 0 and run.condition("TeacherReady")["status"] == "True"
    set_suspend(cp, ns, "gated-distill-1", False)
    stage_is(run, "distill", queue="Admitted", phase="Running")
