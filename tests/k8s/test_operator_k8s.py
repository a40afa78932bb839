"""The operator against a real control plane (tests/support/controlplane: etcd, kube-apiserver, controller-manager,
scheduler, kwok playing the kubelet).

The operator runs as a subprocess (``opd-operator``) with a ServiceAccount token that holds exactly
``operator/rbac.py``'s rules. Tests play each stage through the same channels a real stage uses: the
stage's ServiceAccount ``<run>-stage`` patches ``status.progress`` (with ``opd_runtime.stage_report``
and a real token), and kwok ends the pod with an exit code and a JSON termination message
(``set_pod_exit``). kwok marks pods Ready, so the teacher Deployment becomes Available by itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from support.controlplane import ControlPlane
from support.operator_harness import TIMEOUT, Operator, Run, exists, tiny_math

ROOT = Path(__file__).resolve().parents[2]


# ---- helpers -----------------------------------------------------------------------------------------


def complete_pipeline_until_distill(run: Run) -> None:
    run.wait("the sft Job", lambda st: st.get("stage") == "sft")
    run.finish(
        f"{run.name}-sft-1",
        0,
        {"stage": "sft", "step": 400, "loss": 0.5, "checkpoint": "/workspace/checkpoints/sft/final"},
    )
    run.wait("the distill Job", lambda st: (st.get("stages", {}).get("distill") or {}).get("phase") == "Running")


# ---- tests ---------------------------------------------------------------------------------------------


def test_crd_explains_fields_and_rejects_invalid_specs(cp: ControlPlane, ns: str):
    # The API server publishes a new CRD's OpenAPI a few seconds after it is Established.
    explain = cp.wait(
        "kubectl explain",
        lambda: cp.kubectl("explain", "distillationrun.spec.distill.klCoef", check=False).stdout,
        timeout=60,
    )
    assert "Advantage scale" in explain
    assert "Stage 2: on-policy distillation" in cp.kubectl("explain", "dr.spec.distill").stdout
    bad_cases = [
        ({"distill": {"steps": "many"}}, "spec.distill.steps"),
        ({"distill": {"steps": -5}}, "spec.distill.steps"),
        ({"distil": {"steps": 5}}, 'unknown field "spec.distil"'),
        ({"eval": {"targets": ["distill", "teacherr"]}}, "spec.eval.targets[1]"),
        (
            {"sft": {"enabled": False}, "distill": {"enabled": False}, "eval": {"enabled": False}},
            "enable at least one of the stages",
        ),
        ({"distill": {"prompts": {"name": "tinymath", "path": "x.jsonl"}}}, "exactly one of `name`"),
        ({"sft": {"enabled": False}, "eval": {"targets": ["sft"]}}, "spec.eval.targets names a stage"),
    ]
    for i, (change, expected) in enumerate(bad_cases):
        doc = tiny_math(f"bad-{i}")
        for key, value in change.items():
            doc["spec"][key] = {**(doc["spec"].get(key) or {}), **value}
        proc = cp.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc), check=False)
        assert proc.returncode != 0 and expected in proc.stderr, (change, proc.stderr)
    for example in sorted((ROOT / "examples").glob("*.yaml")):  # every example is a valid resource
        cp.kubectl("apply", "--dry-run=server", "-n", ns, "-f", str(example))
    assert "No resources found" in cp.kubectl("get", "opd", "-n", ns).stderr  # the `opd` category
    doc = tiny_math("x" * 50)
    proc = cp.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert proc.returncode != 0 and "at most 45 characters" in proc.stderr


def test_tiny_math_runs_through_every_stage_to_succeeded(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math())
    run.wait("the sft stage", lambda st: st.get("stage") == "sft" and st.get("phase") == "Running")
    assert run.jobs() == ["tiny-math-sft-1"]
    pod = run.running_pod("tiny-math-sft-1")  # admitted under PodSecurity restricted
    spec = pod["spec"]["containers"][0]
    assert spec["command"][:2] == ["opd", "sft"] and "--resume" in spec["command"]
    # Plumbing: workspace PVC (bound by kwok's provisioner), run file, the stage's narrow identity.
    for path in (
        f"/api/v1/namespaces/{ns}/persistentvolumeclaims/tiny-math-workspace",
        f"/api/v1/namespaces/{ns}/configmaps/tiny-math-spec",
        f"/api/v1/namespaces/{ns}/serviceaccounts/tiny-math-stage",
    ):
        assert exists(cp, path), path
    # The stage's ServiceAccount may patch its run's status, and nothing else.
    user = f"system:serviceaccount:{ns}:tiny-math-stage"
    assert (
        cp.kubectl(
            "auth",
            "can-i",
            "patch",
            "distillationruns/tiny-math",
            "--subresource=status",
            "-n",
            ns,
            as_user=user,
            check=False,
        ).stdout.strip()
        == "yes"
    )
    for args in (
        ("patch", "distillationruns/tiny-math"),
        ("patch", "distillationruns/other", "--subresource=status"),
        ("create", "pods"),
        ("get", "secrets"),
    ):
        assert cp.kubectl("auth", "can-i", *args, "-n", ns, as_user=user, check=False).stdout.strip() == "no", args

    run.report_progress("sft", 120, 400)
    run.wait("step 120 from the sft stage's progress", lambda st: st.get("step") == 120)
    assert run.get_dr()["STEP"] == "120"
    run.finish(
        "tiny-math-sft-1",
        0,
        {"stage": "sft", "step": 400, "loss": 0.4, "checkpoint": "/workspace/checkpoints/sft/final"},
    )
    st = run.wait("the distill stage", lambda st: (st.get("stages", {}).get("distill") or {}).get("phase") == "Running")
    assert st["stages"]["sft"]["checkpoint"] == "/workspace/checkpoints/sft/final"
    assert run.condition("TeacherReady")["status"] == "True"
    teacher = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/tiny-math-teacher")
    assert teacher["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["opd", "serve-teacher"]
    assert exists(cp, f"/api/v1/namespaces/{ns}/services/tiny-math-teacher")
    distill = run.running_pod("tiny-math-distill-1")["spec"]["containers"][0]["command"]
    assert distill[distill.index("--teacher-url") + 1] == f"http://tiny-math-teacher.{ns}.svc:8000"

    run.report_progress("distill", 37, 200, reverse_kl=0.6125)
    run.wait("the learner's reverse KL", lambda st: st.get("reverseKL") == 0.6125 and st.get("step") == 37)
    cols = run.get_dr()
    assert (cols["PHASE"], cols["STAGE"], cols["STEP"], cols["REVERSEKL"]) == ("Running", "distill", "37", "0.6125")
    run.finish(
        "tiny-math-distill-1",
        0,
        {"stage": "distill", "step": 200, "reverse_kl": 0.46, "checkpoint": "/workspace/checkpoints/distill/final"},
    )
    run.wait("the eval stage", lambda st: st.get("stage") == "eval")
    cp.wait(
        "the teacher to be removed",
        lambda: not exists(cp, f"/apis/apps/v1/namespaces/{ns}/deployments/tiny-math-teacher"),
        timeout=TIMEOUT,
    )
    run.finish(
        "tiny-math-eval-1",
        0,
        {"stage": "eval", "eval_score": 0.41, "scores": {"student/tinymath": 0.0, "distill/tinymath": 0.41}},
    )
    st = run.wait("Succeeded", lambda st: st.get("phase") == "Succeeded")
    assert run.jobs() == ["tiny-math-distill-1", "tiny-math-eval-1", "tiny-math-sft-1"]
    assert st["observedGeneration"] == run.obj()["metadata"]["generation"]
    states = {c["type"]: c["status"] for c in st["conditions"]}
    assert (
        states.items()
        >= {
            "Ready": "True",
            "Failed": "False",
            "SftSucceeded": "True",
            "DistillSucceeded": "True",
            "EvalSucceeded": "True",
            "TeacherReady": "False",
        }.items()
    )
    for stage in ("sft", "distill", "eval"):
        assert st["stages"][stage]["startTime"] <= st["stages"][stage]["completionTime"]
    cols = run.get_dr()
    assert (cols["PHASE"], cols["STEP"], cols["REVERSEKL"], cols["SCORE"]) == ("Succeeded", "200", "0.46", "0.41")
    reasons = run.events()
    for reason in ("StageStarted", "TeacherReady", "StageSucceeded", "TeacherStopped", "RunSucceeded"):
        assert reason in reasons, reasons
    metrics = operator.metrics()
    assert 'opd_operator_runs{phase="Succeeded"} 1.0' in metrics
    assert 'opd_operator_stage_duration_seconds_count{outcome="succeeded",stage="eval"} 1.0' in metrics
    assert "opd_operator_reconciles_total" in metrics and "opd_operator_reconcile_errors_total 0.0" in metrics


def test_a_failing_stage_is_retried_then_fails_the_run(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math(retries=1, backoffSeconds=1))
    run.wait("the sft stage", lambda st: st.get("stage") == "sft")
    run.finish("tiny-math-sft-1", 1, {"stage": "sft", "exit_code": 1, "error": "RuntimeError: CUDA out of memory"})
    run.wait("the retry", lambda st: st.get("stages", {}).get("sft", {}).get("attempts") == 2)
    assert run.jobs() == ["tiny-math-sft-1", "tiny-math-sft-2"]
    run.finish("tiny-math-sft-2", 1, "Traceback (most recent call last):\nRuntimeError: NCCL watchdog timeout")
    st = run.wait("Failed", lambda st: st.get("phase") == "Failed")
    assert st["stages"]["sft"]["phase"] == "Failed" and st["stages"]["sft"]["failures"] == 2
    failed = run.condition("Failed")
    assert failed["status"] == "True" and failed["reason"] == "SftFailed"
    assert "RetriesExhausted" in failed["message"] and "NCCL watchdog timeout" in failed["message"]
    assert run.get_dr()["PHASE"] == "Failed"
    assert "StageFailed" in run.events() and "RunFailed" in run.events()
    time.sleep(2)
    assert run.jobs() == ["tiny-math-sft-1", "tiny-math-sft-2"]


def test_bad_configuration_fails_at_once_with_the_stage_message(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math())
    run.wait("the sft stage", lambda st: st.get("stage") == "sft")
    run.finish(
        "tiny-math-sft-1",
        2,
        {"stage": "sft", "exit_code": 2, "error": "spec.sft.dataset.path: no such file /workspace/x.jsonl"},
    )
    run.wait("Failed", lambda st: st.get("phase") == "Failed")
    assert "spec.sft.dataset.path: no such file" in run.condition("Failed")["message"]
    assert run.jobs() == ["tiny-math-sft-1"]


def test_operator_restarts_mid_run_without_duplicate_children(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math())
    run.wait("the sft stage", lambda st: st.get("stage") == "sft")
    operator.kill()
    operator.start()
    time.sleep(2)
    assert run.jobs() == ["tiny-math-sft-1"]
    run.finish("tiny-math-sft-1", 0, {"stage": "sft", "step": 400})
    run.wait("the distill Job", lambda st: (st.get("stages", {}).get("distill") or {}).get("phase") == "Running")
    operator.kill()
    run.finish("tiny-math-distill-1", 0, {"stage": "distill", "step": 200, "reverse_kl": 0.5})
    operator.start()
    run.wait("the eval stage", lambda st: st.get("stage") == "eval")
    operator.kill()
    operator.start()
    run.finish("tiny-math-eval-1", 0, {"stage": "eval", "eval_score": 0.3})
    run.wait("Succeeded", lambda st: st.get("phase") == "Succeeded")
    assert run.jobs() == ["tiny-math-distill-1", "tiny-math-eval-1", "tiny-math-sft-1"]
    deployments = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]
    assert deployments == []
    assert run.status()["stages"]["teacher"]["attempts"] == 1


def test_suspend_then_resume(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math())
    complete_pipeline_until_distill(run)
    cp.kubectl("patch", "dr", run.name, "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    run.wait("Suspended", lambda st: st.get("phase") == "Suspended")
    cp.wait(
        "stage pods and the teacher to go",
        lambda: (
            not cp.pods(ns, "opd.dev/stage in (distill,teacher)")
            and not exists(cp, f"/apis/apps/v1/namespaces/{ns}/deployments/tiny-math-teacher")
        ),
        timeout=TIMEOUT,
    )
    assert run.jobs() == ["tiny-math-sft-1"]
    assert exists(cp, f"/api/v1/namespaces/{ns}/persistentvolumeclaims/tiny-math-workspace")
    assert run.get_dr()["PHASE"] == "Suspended"
    cp.kubectl("patch", "dr", run.name, "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    run.wait(
        "distill again",
        lambda st: (
            (st.get("stages", {}).get("distill") or {}).get("attempts") == 2
            and st["stages"]["distill"]["phase"] == "Running"
        ),
    )
    assert run.jobs() == ["tiny-math-distill-2", "tiny-math-sft-1"]
    assert run.status()["stages"]["distill"]["failures"] == 0
    assert "Suspended" in run.events() and "Resumed" in run.events()
    cmd = run.running_pod("tiny-math-distill-2")["spec"]["containers"][0]["command"]
    assert "--resume" in cmd


def test_spec_edit_of_the_running_stage_is_refused_with_a_condition(cp: ControlPlane, ns: str, operator: Operator):
    run = Run(cp, ns, tiny_math())
    run.wait("the sft stage", lambda st: st.get("stage") == "sft")
    cp.kubectl("patch", "dr", run.name, "-n", ns, "--type=merge", "-p", '{"spec": {"sft": {"steps": 10}}}')
    run.wait(
        "SpecAccepted=False",
        lambda st: any(c["type"] == "SpecAccepted" and c["status"] == "False" for c in st.get("conditions", [])),
    )
    assert "spec.sft.steps" in run.condition("SpecAccepted")["message"]
    cm = cp.get(f"/api/v1/namespaces/{ns}/configmaps/tiny-math-spec")
    assert "steps: 400" in cm["data"]["run.yaml"]
    proc = cp.kubectl(
        "patch",
        "dr",
        run.name,
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec": {"teacher": {"model": "tiny://student"}}}',
        check=False,
    )
    assert proc.returncode != 0 and "spec.teacher.model is immutable" in proc.stderr


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
def test_deletion_removes_children_and_honours_the_pvc_policy(
    cp: ControlPlane, ns: str, operator: Operator, policy: str
):
    run = Run(cp, ns, tiny_math(workspace={"size": "2Gi", "retentionPolicy": policy}))
    complete_pipeline_until_distill(run)
    cp.kubectl("delete", "dr", run.name, "-n", ns, "--wait=true", "--timeout=60s")
    children = [
        f"/apis/batch/v1/namespaces/{ns}/jobs/tiny-math-distill-1",
        f"/apis/apps/v1/namespaces/{ns}/deployments/tiny-math-teacher",
        f"/api/v1/namespaces/{ns}/services/tiny-math-teacher",
        f"/api/v1/namespaces/{ns}/configmaps/tiny-math-spec",
        f"/api/v1/namespaces/{ns}/serviceaccounts/tiny-math-stage",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/tiny-math-stage",
    ]
    cp.wait("the children to be garbage-collected", lambda: not any(exists(cp, p) for p in children), timeout=TIMEOUT)
    pvc = f"/api/v1/namespaces/{ns}/persistentvolumeclaims/tiny-math-workspace"
    if policy == "Retain":
        time.sleep(2)
        kept = cp.get(pvc)
        assert "ownerReferences" not in kept["metadata"]
    else:
        cp.wait("the workspace PVC to be deleted", lambda: not exists(cp, pvc), timeout=TIMEOUT)


def test_a_stage_message_of_wrong_types_leaves_the_run_patchable_and_flagged(
    cp: ControlPlane, ns: str, operator: Operator
):
    run = Run(cp, ns, tiny_math())
    run.wait("the sft stage", lambda st: st.get("stage") == "sft")
    # a string step, a numeric checkpoint and a NaN: each would make the status patch fail its schema
    run.finish("tiny-math-sft-1", 0, '{"stage": "sft", "step": "four hundred", "checkpoint": 5, "reverse_kl": NaN}')
    st = run.wait("sft Succeeded and distill started", lambda st: st.get("stages", {}).get("distill", {}).get("job"))
    sft = st["stages"]["sft"]
    assert sft["phase"] == "Succeeded" and "step" not in sft and "checkpoint" not in sft and "reverseKL" not in sft
    assert "BadTerminationMessage" in run.events()
    items = cp.get(f"/api/v1/namespaces/{ns}/events")["items"]
    flagged = next(e["message"] for e in items if e["reason"] == "BadTerminationMessage")
    assert "step: not a number" in flagged and "checkpoint: not a string" in flagged and "reverse_kl" in flagged


def api_requests(operator: Operator) -> float:
    """opd_operator_api_requests_total summed over verbs and resources: every request of the operator's
    own client (kopf's watch streams are not in it)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in operator.metrics().splitlines()
        if line.startswith("opd_operator_api_requests_total{")
    )


def fail_with_bad_config(run: Run) -> None:
    run.wait("the sft stage", lambda st: st.get("stage") == "sft")
    run.finish(f"{run.name}-sft-1", 2, {"stage": "sft", "error": "spec.sft.dataset.path: no such file"})
    run.wait("Failed", lambda st: st.get("phase") == "Failed")


def test_a_finished_run_costs_no_api_requests_until_it_is_edited(cp: ControlPlane, ns: str, operator: Operator):
    # The test operator resyncs every 0.5 s: a run with a loop makes a GET and ten LISTs each time.
    run = Run(cp, ns, tiny_math())
    fail_with_bad_config(run)
    time.sleep(1)  # the round that wrote Failed (and its events) is over
    before = api_requests(operator)
    time.sleep(3)
    assert api_requests(operator) == before, "a finished run still costs requests"
    assert 'opd_operator_runs{phase="Failed"} 1.0' in operator.metrics()
    # no loop, no finalizer: deleting a finished run needs no operator
    assert "opd.dev/operator" not in run.obj()["metadata"].get("finalizers", [])
    # an edit brings its loop back: exit code 2 is retried once the spec changes
    cp.kubectl("patch", "dr", run.name, "-n", ns, "--type=merge", "-p", '{"spec": {"retries": 3}}')
    run.wait("the retried sft attempt", lambda st: st.get("stages", {}).get("sft", {}).get("attempts") == 2)
    assert api_requests(operator) > before


def test_ttl_after_finished_deletes_the_children_and_keeps_the_run_and_workspace(
    cp: ControlPlane, ns: str, operator: Operator
):
    run = Run(cp, ns, tiny_math(ttlSecondsAfterFinished=0))
    fail_with_bad_config(run)
    st = run.wait("the children deleted", lambda st: st.get("childrenDeletedTime"))
    assert st["phase"] == "Failed" and "no such file" in st["message"]
    children = [
        f"/apis/batch/v1/namespaces/{ns}/jobs/tiny-math-sft-1",
        f"/api/v1/namespaces/{ns}/configmaps/tiny-math-spec",
        f"/api/v1/namespaces/{ns}/serviceaccounts/tiny-math-stage",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/tiny-math-stage",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/tiny-math-stage",
    ]
    cp.wait("the children to go", lambda: not any(exists(cp, p) for p in children), timeout=TIMEOUT)
    assert exists(cp, f"/api/v1/namespaces/{ns}/persistentvolumeclaims/tiny-math-workspace")  # Retain
    assert "ChildrenDeleted" in run.events()
    before = api_requests(operator)
    time.sleep(2)
    assert api_requests(operator) == before, "nothing is re-created or re-checked after the TTL"
