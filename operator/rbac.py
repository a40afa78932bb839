"""Every permission the operator and the stage pods need, written once as data, each with its reason.

``USES`` maps each (API group, resource) the operator touches to its verbs, and each verb to the code
path that needs it. ``OPERATOR_RULES`` — the operator's ClusterRole, which the Helm chart copies — is
derived from it, so a verb cannot be granted without a reason. Two tests hold it to the code:
``tests/unit/test_rbac.py`` reads the operator's source (every API call, kopf watch and created kind maps to a
granted verb, and every granted verb to a call), and ``tests/k8s/test_rbac_k8s.py`` runs a run end to end
under the chart's RBAC on a real API server, compares the audit log with these rules, and shows that
removing a rule makes its step fail with 403.

``stage_rules(run)`` is the Role the operator creates per run for the ServiceAccount ``<run>-stage`` of its
stage pods: merge-patch their own run's status (they never read it); the ValidatingAdmissionPolicy of
``admission.py`` (installed by the chart) lets the API server admit only changes to ``status.progress``
from them.

Creating that Role needs no ``escalate``/``bind`` verbs: RBAC lets a subject grant permissions it holds,
and the operator holds ``patch`` on ``distillationruns/status`` itself.

Adding a permission (other features): add the verb to ``USES`` with the function that calls it — e.g.
``("coordination.k8s.io", "leases"): {"get": ..., "create": ..., "update": ...}`` for leader election, or
``"patch"`` on ``("batch", "jobs")`` for Kueue's ``spec.suspend`` — then ``make chart``;
``tests/unit/test_rbac.py`` fails until the code really makes that call.
"""

from __future__ import annotations

from typing import Any

from opd_runtime.contract import GROUP, PLURAL

Rule = dict[str, Any]
CORE, BATCH, APPS, RBAC = "", "batch", "apps", "rbac.authorization.k8s.io"

_CREATE = "kube.apply_action: reconcile creates it (create)"
_GET_ON_CONFLICT = "kube.apply_action: a create answered 409 reads the existing object to check it is the run's"
_LIST = "kube.list_children: observe lists each run's children by label"
_KOPF_WATCH = "handlers.child_changed: kopf lists and watches it to wake the run's reconcile"
_TTL_DELETE = "ttl.expire: deletes a finished run's children once spec.ttlSecondsAfterFinished has passed"
_INDEX = "handlers.run_children: kopf lists and watches it to keep each run's children in memory (cache.py)"

# (API group, resource) -> verb -> the code path that needs it. Verbs not listed here are not granted.
USES: dict[tuple[str, str], dict[str, str]] = {
    (GROUP, PLURAL): {
        "get": "driver.reconcile_once: reads the run",
        "list": "handlers.reconcile_run: kopf lists and watches runs (daemons, run_changed)",
        "watch": "handlers.reconcile_run: kopf lists and watches runs (daemons, run_changed)",
        "patch": "handlers.configure: kopf patches its finalizer and annotations onto the run",
    },
    # Children carry an ownerReference with blockOwnerDeletion (names.owner_reference), so the garbage
    # collector deletes them before the run; the OwnerReferencesPermissionEnforcement admission plugin (on in
    # OpenShift) admits such a reference only from a subject that may update the owner's finalizers.
    (GROUP, f"{PLURAL}/finalizers"): {
        "update": "names.owner_reference: blockOwnerDeletion on every child's reference to its run",
    },
    (GROUP, f"{PLURAL}/status"): {
        "patch": "driver.reconcile_once: writes the status (report_refusal too); granted onward in stage_rules",
    },
    (BATCH, "jobs"): {
        "create": _CREATE,
        "get": _GET_ON_CONFLICT,
        "list": _LIST,
        "watch": _KOPF_WATCH,
        "delete": "reconcile._Walk.suspend: deletes the running Jobs",
    },
    (APPS, "deployments"): {
        "create": _CREATE,
        "get": _GET_ON_CONFLICT,
        "list": _LIST,
        "watch": _KOPF_WATCH,
        "delete": "teacher.TeacherSteps.stop_teacher: removes the teacher (also a stale or failed one)",
    },
    (CORE, "services"): {
        "create": _CREATE,
        "get": _GET_ON_CONFLICT,
        "list": _LIST,
        "watch": _INDEX,
        "delete": "teacher.TeacherSteps.stop_teacher: removes the teacher's Service (drop_ranks_service too)",
    },
    (CORE, "persistentvolumeclaims"): {
        "create": _CREATE,
        "get": "driver.reconcile_once: reads claims the run names but does not label (and on a 409)",
        "list": _LIST,
        "patch": "reconcile._Walk.plumbing: sets or clears the workspace's ownerReference (retentionPolicy)",
        "watch": _KOPF_WATCH,
        # also what OwnerReferencesPermissionEnforcement (on in OpenShift) checks: it admits a change to an
        # existing object's ownerReferences only from a subject that may delete that object
        "delete": "ttl.expire: deletes a finished run's workspace (retentionPolicy Delete); plumbing's "
        "ownerReference patch on it",
    },
    (CORE, "configmaps"): {
        "create": _CREATE,
        "get": _GET_ON_CONFLICT,
        "list": _LIST,
        "watch": _INDEX,
        "patch": "reconcile._Walk.spec_freeze: writes an edited spec into <run>-spec",
        "delete": _TTL_DELETE,
    },
    (CORE, "serviceaccounts"): {
        "create": _CREATE,
        "get": _GET_ON_CONFLICT,
        "list": _LIST,
        "watch": _INDEX,
        "delete": _TTL_DELETE,
    },
    (RBAC, "roles"): {
        "create": _CREATE,
        "get": _GET_ON_CONFLICT,
        "list": _LIST,
        "watch": _INDEX,
        "delete": _TTL_DELETE,
    },
    (RBAC, "rolebindings"): {
        "create": _CREATE,
        "get": _GET_ON_CONFLICT,
        "list": _LIST,
        "watch": _INDEX,
        "delete": _TTL_DELETE,
    },
    ("networking.k8s.io", "networkpolicies"): {
        "delete": "reconcile._Walk.plumbing: removes the teacher's policy once spec turns it off",
        "create": _CREATE,
        "get": _GET_ON_CONFLICT,
        "list": _LIST,
        "watch": _INDEX,
    },
    (CORE, "pods"): {"list": _LIST, "watch": _KOPF_WATCH},
    # one core/v1 Event per occurrence, never patched; kopf's own posting is off (handlers.configure)
    (CORE, "events"): {
        "create": "kube.post_event: posts the run's Events",
        "list": "driver.reconcile_once: a pod-less stage Job's Events (FailedCreate: why the API server refuses "
        "its pods), by field selector involvedObject.uid",
    },
    # cluster-scoped, kopf's discovery (the chart's rbac.clusterDiscovery)
    (CORE, "namespaces"): {
        "list": "handlers.configure: kopf's namespace observer when serving named namespaces",
        "watch": "handlers.configure: kopf's namespace observer when serving named namespaces",
    },
    ("apiextensions.k8s.io", "customresourcedefinitions"): {
        "list": "handlers.configure: kopf's resource observer finds the DistillationRun resource",
        "watch": "handlers.configure: kopf's resource observer follows CRD changes",
    },
}

_VERB_ORDER = ["create", "get", "list", "watch", "patch", "update", "delete"]


def _rules() -> list[Rule]:
    """One rule per resource, verbs in a fixed order."""
    return [
        {
            "apiGroups": [group],
            "resources": [resource],
            "verbs": sorted(verbs, key=lambda v: _VERB_ORDER.index(v) if v in _VERB_ORDER else len(_VERB_ORDER)),
        }
        for (group, resource), verbs in USES.items()
    ]


OPERATOR_RULES: list[Rule] = _rules()


def stage_rules(run_name: str) -> list[Rule]:
    """The Role of ``<run>-stage``: patch this one run's status, nothing else (stage_report.StatusPatcher only
    patches; RBAC lets the operator grant this because it holds the same verb)."""
    return [
        {
            "apiGroups": [GROUP],
            "resources": [f"{PLURAL}/status"],
            "resourceNames": [run_name],
            "verbs": ["patch"],
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


def leader_election_rules(lease_name: str) -> list[Rule]:
    """The Role, in the operator's own namespace only, for leader election (leader.LeaderElector): it
    GETs and PUTs (``update``) its one Lease to acquire, renew and release it, and creates it the first
    time (``create`` cannot be limited to a name). Kept out of ``USES``: those rules are granted in every
    watched namespace, and a Lease grant there would let the operator take other controllers' Leases."""
    return [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease_name],
            "verbs": ["get", "update"],
        },
    ]
