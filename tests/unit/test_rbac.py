"""The operator's RBAC rules against its source: every request the code makes is granted, and every granted
verb is a request the code makes (read with ``ast``, no cluster). tests/k8s/test_rbac_k8s.py proves the same
on a real API server (audit log, and 403 when a rule is removed).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from opd_operator import kube, names, rbac, ttl
from opd_operator.observe import KINDS

OPERATOR = Path(__file__).resolve().parents[2] / "operator"
Triple = tuple[str, str, str]

# What kopf itself requests, whatever handlers are registered (kopf/_core/reactor/observation.py): the
# namespace observer lists and watches namespaces when serving named namespaces; the resource observer
# lists and watches CRDs.
KOPF_OBSERVERS: set[Triple] = {
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


def tree(module: str) -> ast.Module:
    return ast.parse((OPERATOR / f"{module}.py").read_text())


def group_resource(kind: str) -> tuple[str, str]:
    prefix, plural = kube.RESOURCES[kind]
    return ("" if prefix == "/api/v1" else prefix.split("/")[2]), plural


def literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def calls(module: str, owner: str, method: str) -> list[ast.Call]:
    """Calls ``<owner>.<method>(...)`` in ``operator/<module>.py``."""
    return [
        node
        for node in ast.walk(tree(module))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == method
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == owner
    ]


def created_kinds() -> set[str]:
    """Kinds of the whole objects (apiVersion, kind, metadata) that children.py builds and kube.py posts."""
    out = set()
    for module in ("children", "kube"):
        for node in ast.walk(tree(module)):
            if isinstance(node, ast.Dict):
                keys = {literal(k) for k in node.keys if k is not None}
                if {"apiVersion", "kind", "metadata"} <= keys:
                    kind = literal(node.values[[literal(k) for k in node.keys].index("kind")])
                    if kind:
                        out.add(kind)
    return out


def requests_in_code() -> set[Triple]:
    out: set[Triple] = set()

    def add(kind: str, verb: str, sub: str = "") -> None:
        group, resource = group_resource(kind)
        out.add((group, resource + (f"/{sub}" if sub else ""), verb))

    for call in calls("driver", "api", "get"):
        add(literal(call.args[0]) or "?", "get")
    for call in calls("driver", "api", "patch"):
        sub = next((literal(k.value) for k in call.keywords if k.arg == "subresource"), "") or ""
        add(literal(call.args[0]) or "?", "patch", sub)
    for call in calls("driver", "api", "list"):  # e.g. a pod-less Job's Events
        add(literal(call.args[0]) or "?", "list")
    for kind in KINDS:  # kube.list_children (kopf's watches and indexes: kopf_requests)
        add(kind, "list")
    for module in ("reconcile", "teacher"):
        for call in calls(module, "self", "delete"):
            add(literal(call.args[0]) or "?", "delete")
    for kind in ttl.DELETED_KINDS:  # ttl.expire: a finished run's children, once its TTL has passed
        add(kind, "delete")
    for node in ast.walk(tree("reconcile")):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Action" and len(node.args) >= 2:
            verb, kind = literal(node.args[0]), literal(node.args[1])
            if verb and kind:  # Action("patch", "ConfigMap", ...); self.create/self.delete wrap the others
                add(kind, verb)
    # OwnerReferencesPermissionEnforcement: a reference with blockOwnerDeletion needs update on the owner's
    # finalizers, whatever the child's kind
    if names.owner_reference({"metadata": {"name": "x", "uid": "u"}}).get("blockOwnerDeletion"):
        add("DistillationRun", "update", "finalizers")
    # ... and a change to an existing object's ownerReferences needs delete on that object: the workspace
    # claim's reference is patched when retentionPolicy changes (a created child is exempt)
    add("PersistentVolumeClaim", "delete")
    for kind in created_kinds():
        add(kind, "create")
        if kind != "Event":  # kube.apply_action reads an object that answered a create with 409
            add(kind, "get")
    return out | kopf_requests() | KOPF_OBSERVERS


def kopf_requests() -> set[Triple]:
    """What kopf requests for the handlers ``operator/handlers.py`` registers (read from kopf's own registry,
    so loops and decorators alike count): every resource a handler or an index is registered for is listed
    and watched; a daemon's resource also gets kopf's finalizer and annotations (patch)."""
    import kopf

    from opd_operator import handlers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    out: set[Triple] = set()
    for attr in ("_watching", "_indexing", "_spawning", "_changing", "_webhooks"):
        for handler in getattr(registry, attr).get_all_handlers():
            sel = handler.selector
            assert sel is not None and sel.any_name, handler  # a plural each, no kind/category patterns
            out |= {(sel.group or "", sel.any_name, "list"), (sel.group or "", sel.any_name, "watch")}
            if attr == "_spawning":
                out.add((sel.group or "", sel.any_name, "patch"))
    return out


def delegated() -> set[Triple]:
    """What the operator grants onward in the stage Role: RBAC lets it grant only what it holds."""
    return {
        (g, r, v)
        for rule in rbac.stage_rules("x")
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def granted() -> set[Triple]:
    return {
        (g, r, v)
        for rule in rbac.OPERATOR_RULES
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_every_request_the_code_makes_is_granted():
    missing = requests_in_code() | delegated()
    assert not (missing - granted()), f"the code makes requests the ClusterRole lacks: {sorted(missing - granted())}"


def test_every_granted_verb_is_a_request_the_code_makes():
    unused = granted() - requests_in_code() - delegated()
    assert not unused, f"granted but no code path needs it: {sorted(unused)} (remove them from rbac.USES)"


def test_every_rule_names_the_function_that_needs_it():
    assert granted() == {(g, r, v) for (g, r), verbs in rbac.USES.items() for v in verbs}
    for (group, resource), verbs in rbac.USES.items():
        for verb, why in verbs.items():
            where, _, what = why.partition(": ")
            module, *attrs = where.split(".")
            obj = importlib.import_module(f"opd_operator.{module}")
            for attr in attrs:
                obj = getattr(obj, attr)  # AttributeError names a stale reference
            assert callable(obj) and what, (group, resource, verb, why)


def test_the_scan_sees_each_kind_of_call():
    """The reader above finds something of each sort it looks for, so an empty scan cannot pass."""
    found = requests_in_code()
    for triple in [
        ("opd.dev", "distillationruns", "get"),  # driver: api.get
        ("opd.dev", "distillationruns/status", "patch"),  # driver: api.patch(subresource="status")
        ("batch", "jobs", "delete"),  # reconcile: self.delete
        ("", "configmaps", "patch"),  # reconcile: Action("patch", ...)
        ("rbac.authorization.k8s.io", "rolebindings", "create"),  # children: a RoleBinding
        ("", "events", "create"),  # kube.post_event
        ("apps", "deployments", "watch"),  # handlers: kopf.on.event
        ("opd.dev", "distillationruns", "patch"),  # handlers: kopf.daemon
    ]:
        assert triple in found, triple
    assert ("", "secrets", "get") not in found


def test_the_chart_installs_the_stage_status_policy_unless_told_not_to():
    """The chart's policy is operator/admission.py's (through files/stage-status-policy.yaml), bound with
    Deny; the namespaced variant (no cluster-scoped objects) and rbac.stageStatusPolicy=false leave it out."""
    from opd_operator.admission import guarded_fields, policy_spec

    from support.chart import CHART, by_kind, one, render

    objs = render()
    policy, binding = one(objs, "ValidatingAdmissionPolicy"), one(objs, "ValidatingAdmissionPolicyBinding")
    assert policy["spec"] == policy_spec()
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert {"phase", "stages", "conditions", "evalScore"} <= set(
        guarded_fields()
    ) and "progress" not in guarded_fields()
    assert not by_kind(render(sets={"rbac.stageStatusPolicy": "false"}), "ValidatingAdmissionPolicy")
    assert not by_kind(render(CHART / "ci" / "namespaced-values.yaml"), "ValidatingAdmissionPolicy")


def test_the_admission_command_prints_the_policy_and_its_binding():
    import subprocess
    import sys

    import yaml

    from opd_operator.admission import stage_status_policy

    out = subprocess.run(
        [sys.executable, "-m", "opd_operator.admission"], capture_output=True, text=True, check=True
    ).stdout
    assert list(yaml.safe_load_all(out)) == stage_status_policy()


def test_leader_election_holds_exactly_the_lease_verbs_it_uses():
    """leader.py's Lease requests (HTTP methods read from its source) are the verbs of
    ``rbac.leader_election_rules``, granted in the operator's own namespace only (not in ``USES``)."""
    verb_of = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    used = {
        verb_of[literal(node.args[0]) or "?"]
        for node in ast.walk(tree("leader"))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "request" and node.args
    }
    rules = rbac.leader_election_rules("opd-operator")
    assert used == {v for rule in rules for v in rule["verbs"]} == {"get", "create", "update"}
    assert all(rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"] for rule in rules)
    assert [r.get("resourceNames") for r in rules if set(r["verbs"]) & {"get", "update"}] == [["opd-operator"]]
    assert ("coordination.k8s.io", "leases") not in rbac.USES
