"""Least privilege, proven on the real API server (tests/support/controlplane, RBAC authorisation, audit log).

- The chart is installed (namespaced); ``opd-operator`` runs as the chart's ServiceAccount (a real token)
  and drives a run through a foreign ConfigMap in its way, a suspend, a spec edit, every stage, its
  ttlSecondsAfterFinished and its deletion. The API server's audit log then says which (group, resource,
  verb) the operator used: each is a verb of ``operator/rbac.py``'s ``USES``, and each granted verb was
  used, but for the few this scenario cannot reach (named below, with the test that reaches them).
- Removing one rule from the operator's role makes the reconcile step that needs it fail with 403.
- A run's stage ServiceAccount may change only ``status.progress`` of its run: RBAC lets it patch the
  status subresource, the chart's ValidatingAdmissionPolicy (operator/admission.py) refuses the rest.
- The teacher's NetworkPolicy is created with the run's other children (labelled, owned by the run)
  and selects the teacher pods and the distill pods that the operator really made. No network plugin
  runs here, so nothing enforces it: that it admits only those pods is the policy's meaning, not a
  measured connection. The API key from a Secret reaches the teacher and distill pods as env.
- Children that another party made under a run's child name are not adopted: the run says
  ``ForeignObject`` (condition and Event) until the name is free.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from opd_operator import rbac
from opd_operator.driver import reconcile_once
from opd_operator.kube import ApiError, RestApi
from opd_runtime.stage_report import StatusPatcher

from support.controlplane import ControlPlane
from support.operator_harness import CRD_FILE, Run, exists, tiny_math
from support.processes import free_port, stop_process

RELEASE = "opd-lp"
# The granted verbs the end-to-end scenario does not reach, and where they are reached instead.
NOT_REACHED = {
    # reads after a 409 on create: the scenario's foreign ConfigMap reaches the configmaps one
    *((g, r, "get") for g, r in [("batch", "jobs"), ("apps", "deployments"), ("", "services")]),
    ("networking.k8s.io", "networkpolicies", "get"),
    ("rbac.authorization.k8s.io", "roles", "get"),
    ("rbac.authorization.k8s.io", "rolebindings", "get"),
    ("", "serviceaccounts", "get"),  # test_a_foreign_stage_serviceaccount_is_not_adopted
    ("", "persistentvolumeclaims", "get"),  # claims a run names but does not own (modelCache.existingClaim)
    ("", "events", "list"),  # a Job without pods for 10 s: test_waiting_k8s's ResourceQuota of pods: 0
}
# Verbs that OwnerReferencesPermissionEnforcement checks on the operator's behalf, never requests of their own:
# blockOwnerDeletion on each child (the run's finalizers).
CHECKED_BY_ADMISSION = {
    ("opd.dev", "distillationruns/finalizers", "update"),
}


def triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def used_by(cp: ControlPlane, user: str) -> dict[tuple[str, str, str], int]:
    """(group, resource[/subresource], verb) -> how many audit events of ``user`` name it (a watch has two);
    non-resource requests (discovery: /api, /apis) are left out."""
    out: dict[tuple[str, str, str], int] = {}
    for event in cp.audit(user):
        ref = event.get("objectRef")
        # a watch is logged when it starts streaming (ResponseStarted) and again when it ends
        if not ref or event.get("stage") not in ("ResponseStarted", "ResponseComplete"):
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        key = (ref.get("apiGroup", ""), resource, event["verb"])
        out[key] = out.get(key, 0) + 1
    return out


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane) -> Iterator[tuple[str, Path]]:
    """The chart installed for one namespace (its rules are operator/rbac.py's), and a kubeconfig with a
    real token of the chart's ServiceAccount."""
    cp = control_plane
    ns = cp.new_namespace("opd-least-privilege")
    from support.chart import install, uninstall

    install(cp, RELEASE, ns, "--set", "watch.allNamespaces=false")
    yield ns, cp.serviceaccount_kubeconfig(ns, f"{RELEASE}-opd-operator")
    uninstall(cp, RELEASE, ns)


def start_operator(cp: ControlPlane, kubeconfig: Path, ns: str, log: Path) -> subprocess.Popen:
    env = {**cp.env, "KUBECONFIG": str(kubeconfig), "PYTHONSAFEPATH": "1"}
    argv = [sys.executable, "-m", "opd_operator", "--namespace", ns, "--resync-seconds", "0.5", "--liveness="]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*argv, "--metrics-port", str(free_port())],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def test_the_operator_uses_every_verb_it_holds_and_no_other(control_plane: ControlPlane, release, tmp_path):
    cp, (ns, kubeconfig) = control_plane, release
    user = f"system:serviceaccount:{ns}:{RELEASE}-opd-operator"
    # A ConfigMap of the run's child name that the operator did not make (no labels).
    cp.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tiny-math-spec"}, "data": {"x": "1"}}, ns)
    proc = start_operator(cp, kubeconfig, ns, tmp_path / "operator.log")
    try:
        doc = tiny_math()
        doc["spec"]["teacher"]["serving"]["apiKeySecret"] = {"name": "teacher-key", "key": "token"}
        run = Run(cp, ns, doc)
        st = run.wait("the ForeignObject refusal", lambda st: "ForeignObject" in json.dumps(st.get("conditions")))
        assert "ConfigMap tiny-math-spec already exists without the label opd.dev/run=tiny-math" in st["message"]
        # the refusal's status patch lands before its Event is posted (driver.report_refusal)
        cp.wait("the ForeignObject event", lambda: "ForeignObject" in run.events(), timeout=10)
        assert cp.get(f"/api/v1/namespaces/{ns}/configmaps/tiny-math-spec")["data"] == {"x": "1"}  # untouched
        cp.kubectl("delete", "configmap", "tiny-math-spec", "-n", ns)
        run.wait("the sft stage", lambda st: st.get("stage") == "sft" and st.get("phase") == "Running")
        # suspend (the Job is deleted), edit the spec meanwhile (the run file is rewritten), resume
        cp.kubectl("patch", "dr", "tiny-math", "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": true}}')
        run.wait("Suspended", lambda st: st.get("phase") == "Suspended")
        cp.wait("the sft Job to go", lambda: not run.jobs(), timeout=45)
        edit = {"spec": {"suspend": False, "workspace": {"retentionPolicy": "Delete"}, "distill": {"steps": 150}}}
        cp.kubectl("patch", "dr", "tiny-math", "-n", ns, "--type=merge", "-p", json.dumps(edit))
        cp.wait(
            "the edited run file",
            lambda: "steps: 150" in cp.get(f"/api/v1/namespaces/{ns}/configmaps/tiny-math-spec")["data"]["run.yaml"],
        )
        run.finish("tiny-math-sft-2", 0, {"stage": "sft", "step": 400, "checkpoint": "/workspace/checkpoints/sft/f"})
        run.wait("the distill stage", lambda st: (st.get("stages", {}).get("distill") or {}).get("phase") == "Running")
        check_teacher_access(cp, ns, run)
        # turned off while distill runs: the policy goes; the stage is not disturbed (not in the run file)
        off = {"spec": {"teacher": {"serving": {"networkPolicy": False}}}}
        cp.kubectl("patch", "dr", "tiny-math", "-n", ns, "--type=merge", "-p", json.dumps(off))
        policy = f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/tiny-math-teacher"
        cp.wait("the NetworkPolicy to go", lambda: not exists(cp, policy), timeout=45)
        assert run.condition("SpecAccepted")["status"] == "True"
        pvc = cp.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/tiny-math-workspace")
        assert pvc["metadata"].get("ownerReferences"), "retentionPolicy Delete: the run owns its workspace"
        run.finish("tiny-math-distill-1", 0, {"stage": "distill", "step": 200, "reverse_kl": 0.4})
        run.finish("tiny-math-eval-1", 0, {"stage": "eval", "eval_score": 0.5, "scores": {"distill/tinymath": 0.5}})
        run.wait("Succeeded", lambda st: st.get("phase") == "Succeeded")
        cp.wait(
            "the teacher to go", lambda: not exists(cp, f"/apis/apps/v1/namespaces/{ns}/deployments/tiny-math-teacher")
        )
        # finished: ttlSecondsAfterFinished deletes the children, the workspace with them (retentionPolicy Delete)
        cp.kubectl(
            "patch", "dr", "tiny-math", "-n", ns, "--type=merge", "-p", '{"spec": {"ttlSecondsAfterFinished": 0}}'
        )
        run.wait("the children deleted", lambda st: st.get("childrenDeletedTime"))
        cp.wait(
            "the workspace to go",
            lambda: not exists(cp, f"/api/v1/namespaces/{ns}/persistentvolumeclaims/tiny-math-workspace"),
        )
        cp.kubectl("delete", "dr", "tiny-math", "-n", ns, "--wait=true", "--timeout=60s")
        log = (tmp_path / "operator.log").read_text()
        assert "Forbidden" not in log and "403" not in log, log[-3000:]
    finally:
        stop_process(proc, timeout=20)
    used = used_by(cp, user)
    granted = triples(rbac.OPERATOR_RULES)
    assert set(used) <= granted, f"used but not granted: {sorted(set(used) - granted)}"
    unused = granted - set(used)
    assert unused == NOT_REACHED | CHECKED_BY_ADMISSION, f"granted but never used: {sorted(unused)}"
    # every verb in USES has a reason, and the chart grants exactly the USES verbs
    assert granted == {(g, r, v) for (g, r), verbs in rbac.USES.items() for v in verbs}


def check_teacher_access(cp: ControlPlane, ns: str, run: Run) -> None:
    """While distill runs: the NetworkPolicy selects the real teacher pods and admits the real distill pod
    on the serving port only; both pods read the API key from the Secret."""
    policy = cp.get(f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/tiny-math-teacher")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == run.obj()["metadata"]["uid"]
    assert policy["metadata"]["labels"]["opd.dev/run"] == "tiny-math"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"] and len(spec["ingress"]) == 1
    assert spec["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]

    def selected(selector: dict) -> list[str]:
        labels = ",".join(f"{k}={v}" for k, v in selector["matchLabels"].items())
        return sorted(p["metadata"]["labels"]["opd.dev/stage"] for p in cp.pods(ns, labels))

    assert selected(spec["podSelector"]) == ["teacher"]
    (peer,) = spec["ingress"][0]["from"]
    assert list(peer) == ["podSelector"] and selected(peer["podSelector"]) == ["distill"]
    key = {"name": "OPD_TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "teacher-key", "key": "token"}}}
    for stage in ("teacher", "distill"):
        (pod,) = cp.pods(ns, f"opd.dev/run=tiny-math,opd.dev/stage={stage}")
        assert key in pod["spec"]["containers"][0]["env"], stage


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> ControlPlane:
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    control_plane.wait_established("distillationruns.opd.dev")
    return control_plane


def kubeconfig_with_rules(cp: ControlPlane, ns: str, account: str, rules: list[dict]) -> Path:
    """A real token of ServiceAccount ``account`` in ``ns``, bound to a Role of exactly ``rules`` there."""
    ref = {"name": account, "namespace": ns}
    cp.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": ref},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": ref, "rules": rules},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": ref,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
                "subjects": [{"kind": "ServiceAccount", **ref}],
            },
        ]
    )
    return cp.serviceaccount_kubeconfig(ns, account)


def without(group: str, resource: str, verb: str) -> list[dict]:
    """``OPERATOR_RULES`` less one verb on one resource."""
    rules = [
        dict(rule, verbs=[v for v in rule["verbs"] if {(group, resource, v)} - triples([rule]) or v != verb])
        for rule in rbac.OPERATOR_RULES
    ]
    assert triples(rules) == triples(rbac.OPERATOR_RULES) - {(group, resource, verb)}
    return [rule for rule in rules if rule["verbs"]]


def reconcile_until(api: RestApi, ns: str, done, run: str = "tiny-math") -> None:
    """``reconcile_once`` every 0.2 s (kwok binds the workspace claim meanwhile) until ``done()``."""

    def step() -> bool:
        reconcile_once(api, ns, run)
        return bool(done())

    deadline = time.monotonic() + 30
    while not step():
        assert time.monotonic() < deadline, "the reconcile did not get there in 30 s"
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("group", "resource", "verb", "refused"),
    [
        ("opd.dev", "distillationruns", "get", "distillationruns"),
        ("", "pods", "list", "pods"),
        ("", "configmaps", "create", "configmaps"),
        ("batch", "jobs", "create", "jobs"),
        # RBAC refuses the stage Role (it grants a verb the operator lacks), then the status patch that says so
        ("opd.dev", "distillationruns/status", "patch", 'cannot patch resource "distillationruns/status"'),
        # OwnerReferencesPermissionEnforcement (enabled in the test API server): the children's blockOwnerDeletion
        ("opd.dev", "distillationruns/finalizers", "update", "cannot set blockOwnerDeletion"),
    ],
    ids=["run-get", "pods-list", "configmaps-create", "jobs-create", "status-patch", "finalizers-update"],
)
def test_removing_a_rule_fails_its_step(crd: ControlPlane, k8s_namespace: str, group, resource, verb, refused):
    """The operator's reconcile (in this process: the code the operator runs) under its rules less one verb:
    the step that needs that verb is refused with 403; then under all of them the run gets its sft Job."""
    cp, ns = crd, k8s_namespace
    Run(cp, ns, tiny_math())
    job = f"/apis/batch/v1/namespaces/{ns}/jobs/tiny-math-sft-1"
    cut = RestApi(kubeconfig=str(kubeconfig_with_rules(cp, ns, "cut", without(group, resource, verb))))
    with pytest.raises(ApiError) as err:
        reconcile_until(cut, ns, lambda: exists(cp, job))
    assert err.value.status == 403 and refused in str(err.value), err.value
    assert not exists(cp, job)
    full = RestApi(kubeconfig=str(kubeconfig_with_rules(cp, ns, "full", rbac.OPERATOR_RULES)))
    reconcile_until(full, ns, lambda: exists(cp, job))


def test_a_foreign_stage_serviceaccount_is_not_adopted(crd: ControlPlane, k8s_namespace: str):
    """A ServiceAccount ``<run>-stage`` made by someone else (its bindings could grant anything) is not used
    as the stages' identity: no Job starts, the run says ForeignObject and how to proceed."""
    cp, ns = crd, k8s_namespace
    cp.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tiny-math-stage", "namespace": ns}})
    run = Run(cp, ns, tiny_math())
    api = RestApi(kubeconfig=str(kubeconfig_with_rules(cp, ns, "op", rbac.OPERATOR_RULES)))
    with pytest.raises(ApiError) as err:
        reconcile_once(api, ns, "tiny-math")
    assert err.value.status == 409
    st = run.status()
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ForeignObject")
    assert "ServiceAccount tiny-math-stage already exists without the label opd.dev/run=tiny-math" in st["message"]
    assert "Delete or rename that ServiceAccount" in st["message"] and run.events() == ["ForeignObject"]
    assert not run.jobs()
    cp.kubectl("delete", "serviceaccount", "tiny-math-stage", "-n", ns)
    reconcile_until(api, ns, lambda: run.jobs())
    made = cp.get(f"/api/v1/namespaces/{ns}/serviceaccounts/tiny-math-stage")
    assert made["metadata"]["labels"]["opd.dev/run"] == "tiny-math"


def test_the_stage_account_may_change_only_its_runs_progress(control_plane: ControlPlane, release, tmp_path):
    """With a real token of ``<run>-stage``: a progress patch is admitted (the stage's own reporter), a patch
    of any other status field is refused by the chart's admission policy naming the field; the operator
    (another identity) still writes the whole status."""
    cp, (ns, kubeconfig) = control_plane, release
    name = "progress-only"
    run = Run(cp, ns, tiny_math(name))
    operator = RestApi(kubeconfig=str(kubeconfig))
    reconcile_until(operator, ns, lambda: run.status().get("phase"), run=name)
    token_file = tmp_path / "token"
    token_file.write_text(cp.kubectl("create", "token", f"{name}-stage", "-n", ns).stdout.strip())

    def patch(status: dict, dry_run: bool = False) -> tuple[int, str]:
        req = urllib.request.Request(
            f"{cp.api_url}{run.path}/status" + ("?dryRun=All" if dry_run else ""),
            data=json.dumps({"status": status}).encode(),
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "Authorization": f"Bearer {token_file.read_text()}",
            },
        )
        ctx = ssl.create_default_context(cafile=str(cp.pki / "ca.crt"))
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                return resp.status, ""
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()).get("message", "")

    # the binding takes effect within seconds of the install: a dry run shows when
    cp.wait("the stage-status policy", lambda: patch({"phase": "Succeeded"}, dry_run=True)[0] == 403, timeout=30)
    patcher = StatusPatcher(name, ns, api=cp.api_url, token_file=token_file, ca_file=cp.pki / "ca.crt")
    patcher.patch({"progress": {"stage": "sft", "step": 7, "totalSteps": 400}})  # what a stage sends
    before = run.status()
    assert before["progress"]["step"] == 7
    for change in (
        {"phase": "Succeeded"},
        {"stages": {"sft": {"phase": "Succeeded"}}},
        {
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Forged", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ]
        },
        {"evalScore": 1.0, "progress": {"step": 8}},
    ):
        code, message = patch(change)
        field = next(k for k in change if k != "progress")
        assert code == 403, (change, code, message)
        assert f"status.{field}: a stage's ServiceAccount may change only status.progress" in message, message
    assert run.status() == before  # nothing of the refused patches landed, not even their progress part
    operator.patch(
        "DistillationRun", ns, name, {"status": {"message": "written by the operator"}}, subresource="status"
    )
    assert run.status()["message"] == "written by the operator"
