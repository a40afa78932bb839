"""The operator's decisions without a cluster: plain dicts in, actions + status out (fast).

Most tests drive ``driver.reconcile_once`` against ``FakeApi`` (tests/support/opd_fake_cluster.py), so a test
reads as a story: apply the run, reconcile, finish a Job, reconcile again, check what exists.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from opd_operator import children, driver, names
from opd_operator.observe import observe
from opd_operator.reconcile import changed_paths, decide
from opd_operator.walk import backoff_seconds
from opd_runtime.plan import stage_command
from opd_runtime.spec import parse_run

from support.opd_fake_cluster import T0, Story, cond, tiny_run


def test_a_new_run_gets_its_plumbing_and_the_first_stage_job():
    s = Story()
    d = s.reconcile()
    assert s.api.names("ServiceAccount") == ["tiny-stage"]
    assert s.api.names("Role") == s.api.names("RoleBinding") == ["tiny-stage"]
    assert s.api.names("ConfigMap") == ["tiny-spec"]
    assert s.api.names("PersistentVolumeClaim") == ["tiny-workspace"]
    assert s.jobs() == ["tiny-sft-1"]
    assert s.status["phase"] == "Running" and s.status["stage"] == "sft"
    assert s.status["stages"]["sft"]["attempts"] == 1
    assert s.status["observedGeneration"] == 1
    assert [e.reason for e in d.events] == ["StageStarted"]
    assert cond(s.status, "SftSucceeded")["status"] == "Unknown"
    assert cond(s.status, "Ready")["status"] == "False"


def test_stage_role_allows_only_this_runs_status():
    s = Story()
    s.reconcile()
    role = s.api.of_kind("Role")[0]
    assert role["rules"] == [
        {
            "apiGroups": ["opd.dev"],
            "resources": ["distillationruns/status"],
            "resourceNames": ["tiny"],
            "verbs": ["patch"],
        }
    ]


def test_children_carry_owner_references_and_labels_but_a_retained_pvc_is_not_owned():
    s = Story()
    s.reconcile()
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"):
        obj = s.api.of_kind(kind)[0]
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-tiny", kind
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "opd" and labels["app.kubernetes.io/managed-by"] == "opd-operator"
        assert labels["opd.dev/run"] == "tiny"
    assert s.api.of_kind("Job")[0]["metadata"]["labels"]["opd.dev/stage"] == "sft"
    assert "ownerReferences" not in s.api.of_kind("PersistentVolumeClaim")[0]["metadata"]


def test_retention_policy_delete_owns_the_pvc_and_switching_back_releases_it():
    s = Story(workspace={"size": "2Gi", "retentionPolicy": "Delete"})
    s.reconcile()
    pvc = s.api.of_kind("PersistentVolumeClaim")[0]
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "uid-tiny"
    s.api.edit_spec(workspace={"retentionPolicy": "Retain"})
    s.reconcile()
    assert "ownerReferences" not in s.api.of_kind("PersistentVolumeClaim")[0]["metadata"]


def test_existing_claim_is_used_and_not_created():
    s = Story(workspace={"existingClaim": "shared-ws"})
    s.reconcile()
    assert s.api.names("PersistentVolumeClaim") == []
    job = s.api.of_kind("Job")[0]
    volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "shared-ws"}} in volumes


def test_job_runs_exactly_the_plan_command_in_a_restricted_pod():
    obj = tiny_run(nodeSelector={"pool": "gpu"}, tolerations=[{"key": "gpu", "operator": "Exists"}])
    run = parse_run(obj)
    job = children.stage_job(obj, run, "distill", 3)
    assert job["metadata"]["name"] == "tiny-distill-3"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    want = stage_command(
        run,
        "distill",
        config="/etc/opd/run.yaml",
        workspace="/workspace",
        teacher_url="http://tiny-teacher.ns.svc:8000",
    )
    assert container["command"] == list(want.argv)
    assert "--resume" in container["command"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["serviceAccountName"] == "tiny-stage" and pod["restartPolicy"] == "Never"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OPD_RUN_NAME"] == "tiny" and env["OPD_RUN_NAMESPACE"] == "ns"


def test_gpus_are_requested_as_nvidia_gpu():
    obj = tiny_run()
    obj["spec"]["sft"]["resources"] = {"gpus": 8}
    job = children.stage_job(obj, parse_run(obj), "sft", 1)
    res = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {"requests": {"nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}


def test_teacher_deployment_serves_the_plan_command_and_requests_tensor_parallel_gpus():
    obj = tiny_run()
    obj["spec"]["teacher"]["serving"].pop("resources")  # the default, not the CPU example's gpus: 0
    obj["spec"]["teacher"]["serving"]["tensorParallelSize"] = 2
    run = parse_run(obj)
    dep = children.teacher_deployment(obj, run)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == list(
        stage_command(run, "teacher", config="/etc/opd/run.yaml", workspace="/model-cache", port=8000).argv
    )
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    svc = children.teacher_service(obj, run)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_the_whole_pipeline_in_order():
    s = Story()
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1"]
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400, "checkpoint": "/workspace/checkpoints/sft/final"})
    s.reconcile()
    sft = s.status["stages"]["sft"]
    assert sft["phase"] == "Succeeded" and sft["checkpoint"] == "/workspace/checkpoints/sft/final"
    assert cond(s.status, "SftSucceeded")["status"] == "True"
    # The teacher comes up before the learner starts.
    assert s.api.names("Deployment") == ["tiny-teacher"] and s.api.names("Service") == ["tiny-teacher"]
    assert s.jobs() == ["tiny-sft-1"]
    assert s.status["stage"] == "distill" and s.status["stages"]["distill"]["phase"] == "Waiting"
    assert cond(s.status, "TeacherReady")["status"] == "False"
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1"]
    s.api.make_available("tiny-teacher")
    s.reconcile()
    assert cond(s.status, "TeacherReady")["status"] == "True"
    assert s.jobs() == ["tiny-distill-1", "tiny-sft-1"]
    distill = s.api.objects[("Job", "ns", "tiny-distill-1")]
    assert "http://tiny-teacher.ns.svc:8000" in distill["spec"]["template"]["spec"]["containers"][0]["command"]
    s.api.finish_job(
        "tiny-distill-1",
        0,
        {"stage": "distill", "step": 200, "reverse_kl": 0.42, "checkpoint": "/workspace/checkpoints/distill/final"},
    )
    d = s.reconcile()
    assert s.api.names("Deployment") == [] and s.api.names("Service") == []  # the teacher is removed
    assert "TeacherStopped" in [e.reason for e in d.events]
    assert s.jobs() == ["tiny-distill-1", "tiny-eval-1", "tiny-sft-1"]
    assert s.status["reverseKL"] == 0.42 and s.status["step"] == 200
    s.api.finish_job("tiny-eval-1", 0, {"stage": "eval", "eval_score": 0.41, "scores": {"distill/tinymath": 0.41}})
    d = s.reconcile()
    st = s.status
    assert st["phase"] == "Succeeded" and st["stage"] == "" and st["evalScore"] == 0.41
    assert cond(st, "Ready")["status"] == "True" and cond(st, "EvalSucceeded")["status"] == "True"
    assert "RunSucceeded" in [e.reason for e in d.events]
    assert [o.stage for o in d.outcomes] == ["eval"]
    calls = len(s.api.calls)
    s.reconcile()
    assert all(c[0] != "create" or c[1] == "Event" for c in s.api.calls[calls:])  # nothing new to do


def test_progress_reported_by_the_stage_fills_step_and_reverse_kl():
    s = Story()
    s.to_distill()
    s.api.run()["status"]["progress"] = {"stage": "distill", "step": 17, "totalSteps": 200, "reverseKL": 0.73}
    s.reconcile()
    assert (s.status["step"], s.status["totalSteps"], s.status["reverseKL"]) == (17, 200, 0.73)
    assert s.status["progress"]["step"] == 17  # the operator never overwrites the stage's own report


def test_a_transient_failure_is_retried_after_backoff_then_fails_the_run():
    s = Story(retries=1, backoffSeconds=30)
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 1, {"stage": "sft", "exit_code": 1, "error": "CUDA error: out of memory"})
    d = s.reconcile()
    sft = s.status["stages"]["sft"]
    assert sft["phase"] == "Retrying" and sft["failures"] == 1 and "out of memory" in sft["message"]
    assert "StageFailed" in [e.reason for e in d.events]
    assert d.requeue_after == pytest.approx(29, abs=1)  # the pod finished at T0: see finish_job
    s.now = datetime(2026, 11, 25, 12, 0, 10, tzinfo=UTC)
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1"]
    s.reconcile(seconds=25)
    assert s.jobs() == ["tiny-sft-1", "tiny-sft-2"]
    assert s.status["stages"]["sft"]["attempts"] == 2
    s.api.finish_job("tiny-sft-2", 1, "Traceback (most recent call last):\n  ...\nRuntimeError: NCCL timeout")
    d = s.reconcile()
    st = s.status
    assert st["phase"] == "Failed" and st["stages"]["sft"]["phase"] == "Failed"
    failed = cond(st, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "SftFailed"
    assert "RetriesExhausted" in failed["message"] and "NCCL timeout" in failed["message"]
    assert [(o.stage, o.outcome) for o in d.outcomes] == [("sft", "failed")]
    s.reconcile(seconds=100)
    assert s.jobs() == ["tiny-sft-1", "tiny-sft-2"]


def test_bad_configuration_is_not_retried_until_the_spec_changes():
    s = Story()
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 2, {"stage": "sft", "exit_code": 2, "error": "spec.sft.dataset: no such file"})
    s.reconcile()
    assert s.status["phase"] == "Failed"
    assert "spec.sft.dataset: no such file" in cond(s.status, "Failed")["message"]
    s.reconcile(seconds=3600)
    assert s.jobs() == ["tiny-sft-1"]
    s.api.edit_spec(sft={"steps": 300})
    s.reconcile(seconds=60)
    assert s.jobs() == ["tiny-sft-1", "tiny-sft-2"]
    assert s.status["phase"] == "Running"
    assert cond(s.status, "Failed")["status"] == "False"


def test_a_lost_pod_counts_as_a_transient_failure():
    s = Story(backoffSeconds=0)
    s.reconcile()
    job = s.api.objects[("Job", "ns", "tiny-sft-1")]
    job["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
    for key in [k for k in s.api.objects if k[0] == "Pod"]:
        del s.api.objects[key]
    s.reconcile()
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1", "tiny-sft-2"]
    assert "lost" in s.status["stages"]["sft"]["message"]


def test_suspend_deletes_stage_jobs_and_teacher_and_resume_continues():
    s = Story()
    s.to_distill()
    assert s.jobs() == ["tiny-distill-1", "tiny-sft-1"]
    s.api.edit_spec(suspend=True)
    d = s.reconcile()
    assert s.jobs() == ["tiny-sft-1"] and s.api.names("Deployment") == [] and s.api.names("Service") == []
    assert s.api.names("PersistentVolumeClaim") == ["tiny-workspace"]
    assert s.status["phase"] == "Suspended" and cond(s.status, "Suspended")["status"] == "True"
    assert "Suspended" in [e.reason for e in d.events]
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1"]
    s.api.edit_spec(suspend=False)
    s.reconcile()
    assert s.api.names("Deployment") == ["tiny-teacher"]
    s.api.make_available("tiny-teacher")
    s.reconcile()
    assert s.jobs() == ["tiny-distill-2", "tiny-sft-1"]  # a new attempt, not counted as a failure
    assert s.status["stages"]["distill"]["failures"] == 0
    assert s.status["phase"] == "Running"


def test_a_new_attempt_waits_for_the_previous_pod_to_stop():
    s = Story()
    s.reconcile()
    s.api.delete("Job", "ns", "tiny-sft-1")
    s.api.objects[("Pod", "ns", "tiny-sft-1-pod")] = {
        "kind": "Pod",
        "metadata": {
            "name": "tiny-sft-1-pod",
            "namespace": "ns",
            "labels": {**names.labels("tiny", "sft"), "job-name": "tiny-sft-1"},
        },
        "status": {"phase": "Running"},
    }
    s.reconcile()
    assert s.jobs() == [] and s.status["stages"]["sft"]["phase"] == "Waiting"
    del s.api.objects[("Pod", "ns", "tiny-sft-1-pod")]
    s.reconcile(seconds=600)  # past the back-off: a Job deleted by someone else is a failed attempt
    assert s.jobs() == ["tiny-sft-2"]


def test_restart_with_lost_status_adopts_the_running_job():
    s = Story()
    s.reconcile()
    s.api.run().pop("status")
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1"]
    assert s.status["stages"]["sft"]["attempts"] == 1 and s.status["phase"] == "Running"


def test_spec_edit_of_a_running_stage_is_refused_with_the_field_named():
    s = Story()
    s.reconcile()
    cm_before = s.api.objects[("ConfigMap", "ns", "tiny-spec")]["data"]["run.yaml"]
    s.api.edit_spec(sft={"steps": 10})
    d = s.reconcile()
    accepted = cond(s.status, "SpecAccepted")
    assert accepted["status"] == "False" and accepted["reason"] == "ChangedWhileRunning"
    assert "spec.sft.steps" in accepted["message"] and "suspend" in accepted["message"]
    assert "SpecChangeRefused" in [e.reason for e in d.events]
    assert s.api.objects[("ConfigMap", "ns", "tiny-spec")]["data"]["run.yaml"] == cm_before
    # Once nothing runs, the ConfigMap takes the new spec and later stages use it.
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400})
    s.reconcile()
    assert "steps: 10" in s.api.objects[("ConfigMap", "ns", "tiny-spec")]["data"]["run.yaml"]
    assert cond(s.status, "SpecAccepted")["status"] == "True"


def test_operational_edits_never_conflict():
    s = Story()
    s.reconcile()
    s.api.edit_spec(retries=5, backoffSeconds=1)
    s.reconcile()
    assert cond(s.status, "SpecAccepted")["status"] == "True"


def test_a_spec_the_models_reject_fails_the_run_with_the_reason():
    obj = tiny_run()
    obj["spec"]["distill"]["microBatchSize"] = 10_000
    d = decide(obj, observe("tiny", {}), T0)
    assert d.status["phase"] == "Failed" and not d.actions
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "InvalidSpec" and "microBatchSize" in failed["message"]


def test_run_without_a_served_teacher_skips_the_teacher():
    s = Story()
    s.api.run()["spec"]["teacher"]["backend"] = "local"
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft"})
    s.reconcile()
    assert s.api.names("Deployment") == [] and s.jobs() == ["tiny-distill-1", "tiny-sft-1"]
    assert all(c["type"] != "TeacherReady" for c in s.status["conditions"])


def test_condition_transition_time_is_kept_while_the_status_holds():
    s = Story()
    s.reconcile()
    first = cond(s.status, "Ready")["lastTransitionTime"]
    s.reconcile(seconds=60)
    assert cond(s.status, "Ready")["lastTransitionTime"] == first


def test_backoff_doubles_and_is_capped():
    assert [backoff_seconds(10, n) for n in (1, 2, 3)] == [10, 20, 40]
    assert backoff_seconds(300, 5) == 600


def test_changed_paths_and_merge_patch():
    assert changed_paths({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 1}) == ["spec.a.c", "spec.d"]
    assert driver.merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"a": 1, "b": {"c": 2}}) == {"b": {"c": 2, "d": None}}
    assert driver.merge_patch({"a": [1]}, {"a": [1]}) is None


def test_the_operator_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, opd_operator.handlers, opd_operator.crd; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONSAFEPATH": "1", "PATH": ""})


def test_a_stage_edited_out_of_the_plan_while_running_is_waited_for():
    s = Story()
    s.reconcile()
    # eval no longer scores `sft` either: a target of a stage the run does not enable is refused
    s.api.edit_spec(sft={"enabled": False}, eval={"targets": ["student", "distill", "teacher"]})
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1"] and s.api.names("Deployment") == []
    assert "waiting for tiny-sft-1" in s.status["message"]
    assert cond(s.status, "SpecAccepted")["status"] == "False"
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft"})
    s.reconcile()
    s.api.make_available("tiny-teacher")
    s.reconcile()
    assert s.jobs() == ["tiny-distill-1", "tiny-sft-1"]


def test_a_refused_create_is_reported_on_the_run_and_retried_unchanged():
    s = Story()
    s.api.refuse["Job"] = 'pods "x" is forbidden: violates PodSecurity "restricted:latest"'
    for _ in range(3):
        with pytest.raises(Exception, match="PodSecurity"):
            s.reconcile()
    st = s.api.run()["status"]
    ready = cond(st, "Ready")
    assert ready["reason"] == "ReconcileError" and "create Job tiny-sft-1" in ready["message"]
    assert "PodSecurity" in st["message"]
    events = [o for o in s.api.of_kind("Event") if o["reason"] == "ReconcileError"]
    assert len(events) == 1
    del s.api.refuse["Job"]
    s.reconcile()
    assert s.jobs() == ["tiny-sft-1"] and s.status["stages"]["sft"]["attempts"] == 1
    assert cond(s.status, "Ready")["reason"] == "InProgress"


@pytest.mark.parametrize("ready_timeout_s", [1, 600, 1800, 7205])
def test_teacher_startup_probe_gives_the_whole_ready_timeout_before_the_kubelet_restarts_it(ready_timeout_s):
    obj = tiny_run()
    obj["spec"]["teacher"]["serving"]["readyTimeoutSeconds"] = ready_timeout_s
    dep = children.teacher_deployment(obj, parse_run(obj))
    probe = dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    budget_s = probe["failureThreshold"] * probe["periodSeconds"]
    # at least the timeout (a 32B teacher loading for an hour is not restarted), at most one period more
    assert ready_timeout_s <= budget_s < ready_timeout_s + probe["periodSeconds"]
