"""Every permission the operator and the stage pods need, written once as data.

``OPERATOR_RULES`` is the operator's ClusterRole (the Helm chart copies it; a test proves by
impersonation that the operator runs with exactly these rules). ``stage_rules(run)`` is the Role the
operator creates per run for the ServiceAccount ``<run>-stage`` of its stage pods: they may only read and
merge-patch their own run's status (``status.progress``).

Creating that Role needs no ``escalate``/``bind`` verbs: RBAC lets a subject grant permissions it holds,
and the operator holds get/patch on ``distillationruns/status``.
"""

from __future__ import annotations

from typing import Any

from opd_runtime.contract import GROUP, PLURAL

Rule = dict[str, Any]

_CRUD = ["create", "get", "list", "watch", "patch", "delete"]

OPERATOR_RULES: list[Rule] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "update"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch", "update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _CRUD},
    {
        "apiGroups": [""],
        "resources": ["services", "persistentvolumeclaims", "configmaps", "serviceaccounts"],
        "verbs": _CRUD,
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
    # kube.post_event creates core/v1 Events (one per occurrence, never patched); kopf's own posting is off
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": ["create", "get", "list", "watch", "delete"],
    },
    # kopf itself: namespaces to serve --all-namespaces / namespace patterns, CRDs to find the resource.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
]


def stage_rules(run_name: str) -> list[Rule]:
    """The Role of ``<run>-stage``: get and patch this one run's status, nothing else."""
    return [
        {
            "apiGroups": [GROUP],
            "resources": [f"{PLURAL}/status"],
            "resourceNames": [run_name],
            "verbs": ["get", "patch"],
        }
    ]


def cluster_role(name: str = "opd-operator") -> dict[str, Any]:
    """``OPERATOR_RULES`` as a ClusterRole manifest (tests; the chart renders its own)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": OPERATOR_RULES,
    }
