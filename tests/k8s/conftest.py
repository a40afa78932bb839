"""Fixtures of the control-plane tests: the cluster with the DistillationRun CRD (``cp``), the operator's
least-privilege kubeconfig, a namespace and a running operator per test, two fake GPU nodes; a failing
test that ran an operator gets its log in the report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from opd_operator.rbac import cluster_role

from support.controlplane import ControlPlane
from support.operator_harness import CRD_FILE, Operator


@pytest.fixture(scope="module")
def cp(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with the DistillationRun CRD of crds/ installed."""
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    control_plane.wait_established("distillationruns.opd.dev")
    return control_plane


@pytest.fixture(scope="module")
def operator_kubeconfig(cp: ControlPlane) -> Path:
    """A kubeconfig for ServiceAccount opd-operator, bound to a ClusterRole of exactly rbac.OPERATOR_RULES."""
    ns = cp.new_namespace("opd-system")
    role = cluster_role(f"opd-operator-{ns}")
    cp.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "opd-operator", "namespace": ns}},
            role,
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": role["metadata"]["name"]},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role["metadata"]["name"],
                },
                "subjects": [{"kind": "ServiceAccount", "name": "opd-operator", "namespace": ns}],
            },
        ]
    )
    return cp.serviceaccount_kubeconfig(ns, "opd-operator")


@pytest.fixture
def ns(cp: ControlPlane, k8s_namespace: str) -> str:
    return k8s_namespace


@pytest.fixture
def operator(
    cp: ControlPlane, operator_kubeconfig: Path, ns: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Operator]:
    op = Operator(cp, operator_kubeconfig, ns, tmp_path)
    op.start()
    yield op
    op.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"--- operator log ---\n{op.tail(200)}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if call.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
        op = item.funcargs.get("operator") if hasattr(item, "funcargs") else None
        if report.failed and isinstance(op, Operator):
            report.sections.append(("operator log", op.tail(150)))
    return report


@pytest.fixture
def gpu_nodes(cp: ControlPlane, ns: str):
    """Two fake nodes of 4 GPUs each (kwok plays their kubelets), tainted for this test alone: pods of
    other tests that hold gpu-node-0's GPUs cannot starve the gang, and one pod of 4 GPUs fits per node,
    so the two pods land on two nodes. Yields the spec fields that send a run's pods there."""
    pool = {"key": "opd.dev/test-pool", "value": ns}
    names = [f"{ns}-{i}"[-63:] for i in "ab"]
    amounts = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "4", "ephemeral-storage": "1Ti"}
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {"kubernetes.io/hostname": name, "type": "kwok", pool["key"]: ns},
                },
                "spec": {"taints": [{**pool, "effect": "NoSchedule"}]},
                "status": {"allocatable": amounts, "capacity": amounts},
            }
            for name in names
        ]
    )
    yield {
        "nodeSelector": {pool["key"]: ns},
        "tolerations": [{**pool, "operator": "Equal", "effect": "NoSchedule"}],
    }
    for name in names:
        cp.kubectl("delete", "node", name, "--wait=false", check=False)
