"""Two operator replicas under leader election, and what an idle run costs, on the real control plane.

The replicas are ``opd-operator --leader-elect`` subprocesses with the operator's ServiceAccount token
(rbac.OPERATOR_RULES cluster-wide, rbac.leader_election_rules in the Lease's namespace only, as the chart
grants them), with short Lease times: lease 4 s, renew deadline 3 s, retry 0.5 s. Each replica's own
API requests are counted by its ``opd_operator_api_requests_total{verb,resource}`` metric, so "the standby
wrote nothing" and "an idle run LISTs nothing" are read from the process itself.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opd_operator.__main__ import main as operator_main
from opd_operator.cache import Overlay, from_index
from opd_operator.kube import request_kind
from opd_operator.rbac import cluster_role, leader_election_rules
from opd_operator.walk import Action

from support.controlplane import HELD_IMAGE, ControlPlane
from support.operator_harness import TIMEOUT, Operator, Run, tiny_math

LEASE = "opd-operator"
LEASE_SECONDS, RENEW_SECONDS, RETRY_SECONDS = 4, 3, 0.5
ELECTION_ARGS = (
    "--leader-elect",
    f"--leader-elect-resource-name={LEASE}",
    f"--leader-elect-lease-duration={LEASE_SECONDS}",
    f"--leader-elect-renew-deadline={RENEW_SECONDS}",
    f"--leader-elect-retry-period={RETRY_SECONDS}",
)
REQUEST_LINE = re.compile(r'^opd_operator_api_requests_total\{resource="([^"]+)",verb="([^"]+)"\} ([0-9.e+]+)$', re.M)


def api_requests(op: Operator) -> dict[tuple[str, str], float]:
    """(verb, resource) -> requests so far, from the replica's /metrics."""
    return {(verb, res): float(n) for res, verb, n in REQUEST_LINE.findall(op.metrics())}


def gauge(op: Operator, name: str) -> float | None:
    found = re.search(rf"^{name} ([0-9.e+-]+)$", op.metrics(), re.M)
    return float(found.group(1)) if found else None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--leader-elect-lease-duration=5", "--leader-elect-renew-deadline=5"],
            "lease duration (5.0) > renew deadline",
        ),
        (["--leader-elect-renew-deadline=1", "--leader-elect-retry-period=2"], "renew deadline (1.0) > retry period"),
        (
            [
                "--leader-elect-lease-duration=0.9",
                "--leader-elect-renew-deadline=0.5",
                "--leader-elect-retry-period=0.1",
            ],
            "--leader-elect-lease-duration: at least 1 second",
        ),
    ],
)
def test_lease_timings_that_would_let_two_leaders_act_are_refused_naming_the_flags(
    flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_:
        operator_main(["--leader-elect", "--leader-elect-resource-namespace=x", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "--leader-elect-" in err


def test_leader_election_without_a_namespace_says_how_to_give_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)  # and no in-cluster ServiceAccount file here
    with pytest.raises(SystemExit):
        operator_main(["--leader-elect"])
    assert "--leader-elect-resource-namespace or set POD_NAMESPACE" in capsys.readouterr().err


def test_requests_are_counted_by_rbac_verb_and_resource():
    assert request_kind("GET", "/apis/batch/v1/namespaces/a/jobs") == ("list", "jobs")
    assert request_kind("GET", "/apis/batch/v1/namespaces/a/jobs/j") == ("get", "jobs")
    assert request_kind("PATCH", "/apis/opd.dev/v1alpha1/namespaces/a/distillationruns/r/status") == (
        "patch",
        "distillationruns/status",
    )
    assert request_kind("PUT", "/apis/coordination.k8s.io/v1/namespaces/s/leases/l") == ("update", "leases")
    assert request_kind("POST", "/api/v1/namespaces/a/events") == ("create", "events")


def job(name: str, **meta: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, **meta}}


def test_the_operators_own_create_shows_until_the_index_has_it():
    overlay = Overlay()
    overlay.record("ns", "r", Action("create", "Job", "r-sft-1", job("r-sft-1")))
    empty = from_index([])
    (shown,) = overlay.apply("ns", "r", empty)["Job"]  # the watch event has not arrived yet
    assert shown["metadata"]["name"] == "r-sft-1" and shown["metadata"]["creationTimestamp"]
    assert overlay.apply("ns", "other-run", empty)["Job"] == []
    real = job("r-sft-1", uid="u1")
    assert overlay.apply("ns", "r", from_index([{"kind": "Job", "body": real}]))["Job"] == [real]
    assert overlay.apply("ns", "r", empty)["Job"] == []  # confirmed once: the index alone from then on


def test_the_operators_own_delete_shows_as_deleting_until_the_index_drops_it():
    overlay = Overlay()
    teacher = {"kind": "Deployment", "body": {"metadata": {"name": "r-teacher"}}}
    overlay.record("ns", "r", Action("delete", "Deployment", "r-teacher"))
    (going,) = overlay.apply("ns", "r", from_index([teacher]))["Deployment"]
    assert going["metadata"]["deletionTimestamp"] and "deletionTimestamp" not in teacher["body"]["metadata"]
    assert overlay.apply("ns", "r", from_index([]))["Deployment"] == []
    overlay.record("ns", "r", Action("delete", "Deployment", "r-teacher"))
    overlay.forget("ns", "r")  # after a LIST: nothing pending
    assert overlay.apply("ns", "r", from_index([teacher]))["Deployment"] == [teacher["body"]]


@pytest.fixture(scope="module")
def election(cp: ControlPlane) -> tuple[Path, str]:
    """A ServiceAccount with the operator's ClusterRole and the leader-election Role in its own namespace
    (where the Lease lives): its kubeconfig and that namespace."""
    home = cp.new_namespace("opd-ha")
    role = cluster_role(f"opd-operator-{home}")
    subject = [{"kind": "ServiceAccount", "name": "opd-operator", "namespace": home}]
    ref = {"apiGroup": "rbac.authorization.k8s.io"}
    cp.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "opd-operator", "namespace": home}},
            role,
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": role["metadata"]["name"]},
                "roleRef": {**ref, "kind": "ClusterRole", "name": role["metadata"]["name"]},
                "subjects": subject,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "opd-operator-leader", "namespace": home},
                "rules": leader_election_rules(LEASE),
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "opd-operator-leader", "namespace": home},
                "roleRef": {**ref, "kind": "Role", "name": "opd-operator-leader"},
                "subjects": subject,
            },
        ]
    )
    return cp.serviceaccount_kubeconfig(home, "opd-operator"), home


@pytest.fixture
def replicas(cp: ControlPlane, election: tuple[Path, str], ns: str, tmp_path: Path) -> Iterator[list[Operator]]:
    kubeconfig, home = election
    ops = [
        Operator(
            cp,
            kubeconfig,
            ns,
            tmp_path,
            name=f"replica-{i}",
            args=(*ELECTION_ARGS, f"--leader-elect-resource-namespace={home}"),
        )
        for i in range(3)
    ]
    yield ops
    for op in ops:
        op.stop()


def holder(cp: ControlPlane, home: str) -> str | None:
    lease = cp.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{home}/leases/{LEASE}", ok=(200, 404))
    return (lease.get("spec") or {}).get("holderIdentity")


def identity(op: Operator) -> str | None:
    """The replica's identity once it has led (its log says so), else None."""
    found = re.search(r"leader election: (\S+) now leads", op.log.read_text())
    return found.group(1) if found else None


def test_two_replicas_one_acts_and_the_standby_takes_over_when_the_leader_dies(
    cp: ControlPlane, ns: str, election: tuple[Path, str], replicas: list[Operator]
):
    _, home = election
    first, second, third = replicas
    first.start()
    cp.wait("the first replica to lead", lambda: gauge(first, "opd_operator_leader") == 1.0, timeout=TIMEOUT)
    second.start()
    run = Run(cp, ns, tiny_math())
    run.wait("the sft stage", lambda st: st.get("stage") == "sft" and st.get("phase") == "Running")
    time.sleep(2 * RETRY_SECONDS)  # the standby has tried for the Lease (and failed) a few times by now
    assert holder(cp, home) == identity(first) is not None
    assert gauge(second, "opd_operator_leader") == 0.0
    standby_requests = api_requests(second)
    assert standby_requests and set(standby_requests) == {("get", "leases")}, standby_requests  # no write
    assert gauge(second, "opd_operator_reconciles_total") == 0.0
    assert run.jobs() == ["tiny-math-sft-1"]

    # The leader dies without a word: the standby takes the Lease once it has seen it unrenewed for
    # lease_duration, and continues the run from the cluster's state.
    first.kill()
    killed = time.monotonic()
    cp.wait("the standby to take the Lease", lambda: holder(cp, home) == identity(second), timeout=TIMEOUT)
    took_over = time.monotonic() - killed
    print(f"the standby led {took_over:.1f}s after the leader was killed (lease {LEASE_SECONDS}s)")
    assert took_over < LEASE_SECONDS + 4 * RETRY_SECONDS + 2, f"took over after {took_over:.1f}s"
    run.finish("tiny-math-sft-1", 0, {"stage": "sft", "step": 400})
    run.wait("the distill Job", lambda st: (st.get("stages", {}).get("distill") or {}).get("phase") == "Running")
    assert gauge(second, "opd_operator_reconciles_total") > 0

    # A replica stopped by SIGTERM hands the Lease back: the next standby leads without waiting it out.
    third.start()
    cp.wait("the third replica to stand by", lambda: ("get", "leases") in api_requests(third), timeout=TIMEOUT)
    assert second.proc is not None
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(timeout=TIMEOUT) == 0
    assert "released the Lease" in second.log.read_text()
    cp.wait("the third replica to take the Lease", lambda: holder(cp, home) == identity(third), timeout=TIMEOUT)
    run.finish("tiny-math-distill-1", 0, {"stage": "distill", "step": 200, "reverse_kl": 0.5})
    run.wait("the eval stage", lambda st: st.get("stage") == "eval")
    run.finish("tiny-math-eval-1", 0, {"stage": "eval", "eval_score": 0.3})
    st = run.wait("Succeeded", lambda st: st.get("phase") == "Succeeded")

    # Nothing was created twice across the three leaders: one Job per stage, one teacher.
    assert run.jobs() == ["tiny-math-distill-1", "tiny-math-eval-1", "tiny-math-sft-1"]
    assert st["stages"]["teacher"]["attempts"] == 1
    assert all(s.get("attempts") == 1 for s in st["stages"].values()), st["stages"]
    assert cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments")["items"] == []


def test_an_idle_run_costs_no_request_and_events_wake_it_without_lists(
    cp: ControlPlane, ns: str, operator_kubeconfig: Path, tmp_path: Path
):
    # The operator's default resync (60 s): a reconcile in the windows below comes from an event, or it is
    # a resync (a LIST of every child kind each time).
    op = Operator(cp, operator_kubeconfig, ns, tmp_path, resync_seconds=None)
    op.start()
    try:
        run = Run(cp, ns, tiny_math("held", image=HELD_IMAGE))
        run.wait("the sft stage", lambda st: st.get("stage") == "sft")
        pod = cp.wait_for_pod(ns, "job-name=held-sft-1", lambda p: True, "created")
        name = pod["metadata"]["name"]

        def settled() -> dict | None:  # no reconcile for 2 s: the events of the start are handled
            before = api_requests(op)
            time.sleep(2)
            return before if api_requests(op) == before else None

        before = cp.wait("the operator to settle", settled, timeout=TIMEOUT)
        time.sleep(10)  # idle: nothing happens to the run or its children (a 10 s resync would land in here)
        idle = {k: v - before.get(k, 0) for k, v in api_requests(op).items() if v != before.get(k, 0)}
        assert idle == {}, f"requests while the run was idle: {idle}"

        # The pod's kubelet reports an image pull error: the pod event wakes the run at once.
        cp.set_pod_waiting(ns, name, "ImagePullBackOff", f'Back-off pulling image "{HELD_IMAGE}"')
        changed = time.monotonic()
        run.wait(
            "Stalled=ImagePullError",
            lambda st: any(
                c["type"] == "Stalled" and c["status"] == "True" and c["reason"] == "ImagePullError"
                for c in st.get("conditions", [])
            ),
            timeout=20,
        )
        woke = time.monotonic() - changed  # the last reconcile was >= 12 s before: a resync would need ~48 s
        print(f"Stalled {woke:.1f}s after the pod's waiting state was written")
        # That round read the children from the watch-fed index: a GET of the run, no LIST.
        after = api_requests(op)
        assert after[("get", "distillationruns")] > before[("get", "distillationruns")]
        assert {k: v for k, v in after.items() if k[0] == "list"} == {k: v for k, v in before.items() if k[0] == "list"}

        # A stage's progress report (every 10 s while a stage runs) wakes the run too, and costs no LIST.
        run.report_progress("sft", 7, 400)
        run.wait("step 7", lambda st: st.get("step") == 7)
        lists = {k: v for k, v in api_requests(op).items() if k[0] == "list"}
        assert lists == {k: v for k, v in before.items() if k[0] == "list"}
    finally:
        op.stop()


def test_a_leader_that_loses_its_lease_exits_before_another_may_act(
    cp: ControlPlane, election: tuple[Path, str], replicas: list[Operator]
):
    _, home = election
    leader = replicas[0]
    leader.start()
    cp.wait("the replica to lead", lambda: gauge(leader, "opd_operator_leader") == 1.0, timeout=TIMEOUT)
    # Another holder takes the Lease behind its back (as after a network partition): its renewals fail.
    path = f"/apis/coordination.k8s.io/v1/namespaces/{home}/leases/{LEASE}"
    lease = cp.get(path)
    lease["spec"]["holderIdentity"] = "someone-else"
    cp.request("PUT", path, lease)
    assert leader.proc is not None
    taken = time.monotonic()
    assert leader.proc.wait(timeout=TIMEOUT) == 1  # leader.EXIT_LOST: the kubelet restarts it as a standby
    stopped_after = time.monotonic() - taken
    assert stopped_after < LEASE_SECONDS + 2, f"kept running {stopped_after:.1f}s without the Lease"
    assert "not renewed for" in leader.log.read_text()
    assert holder(cp, home) == "someone-else"  # it did not take the Lease back by force
