"""The ValidatingAdmissionPolicy that lets a run's stage pods change only ``status.progress``.

RBAC can grant the stage ServiceAccount ``<run>-stage`` patch on its own run's ``status`` subresource
(``rbac.stage_rules``) but not on one field of it; without more, code in a stage could mark stages
Succeeded or rewrite conditions. The API server's CEL admission (ValidatingAdmissionPolicy, GA since
Kubernetes 1.30) closes that: for an update of ``distillationruns/status`` made by the run's own stage
account, every status field but ``progress`` must equal its old value (present in both or in neither).
Other identities (the operator, people) are not matched. The chart installs the policy and its binding
(``rbac.stageStatusPolicy``); ``charts/sync.py`` copies ``policy_spec()`` into the chart. Without the chart
(or with a namespaced install that may not create cluster-scoped objects), a cluster admin applies them:
``python -m opd_operator.admission | kubectl apply -f -``.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from opd_runtime.contract import GROUP, PLURAL

from . import crd, names

Manifest = dict[str, Any]
STAGE_WRITABLE = "progress"  # the one status field a stage writes (opd_runtime.stage_report)
API_VERSION = "admissionregistration.k8s.io/v1"


def guarded_fields() -> list[str]:
    """Every status field of the CRD except ``progress``, from the generated schema (a new status field is
    guarded without anyone remembering to add it here)."""
    return [f for f in crd.status_schema()["properties"] if f != STAGE_WRITABLE]


def _unchanged(field: str) -> str:
    new, old = (
        f"(has(object.status) && has(object.status.{field}))",
        f"(has(oldObject.status) && has(oldObject.status.{field}))",
    )
    return f"{new} == {old} && (!{new} || object.status.{field} == oldObject.status.{field})"


def policy_spec() -> Manifest:
    """The ValidatingAdmissionPolicy's spec."""
    suffix = names.stage_account("")  # "-stage": the account is named after its run
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                {
                    "apiGroups": [GROUP],
                    "apiVersions": ["*"],
                    "operations": ["UPDATE"],  # a PATCH is admitted as an UPDATE
                    "resources": [f"{PLURAL}/status"],
                }
            ]
        },
        "matchConditions": [
            {
                "name": "by-the-runs-stage-account",
                "expression": "request.userInfo.username == 'system:serviceaccount:' + request.namespace + ':' "
                f"+ request.name + '{suffix}'",
            }
        ],
        "validations": [
            {
                "expression": _unchanged(field),
                "reason": "Forbidden",
                "message": f"status.{field}: a stage's ServiceAccount may change only status.{STAGE_WRITABLE}; "
                "the operator writes the rest of the status",
            }
            for field in guarded_fields()
        ],
    }


def stage_status_policy(name: str = "opd-stage-status") -> list[Manifest]:
    """The policy and its binding (Deny), as the chart renders them."""
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": policy_spec(),
        },
        {
            "apiVersion": API_VERSION,
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        },
    ]


def main() -> int:
    """Print the policy and its binding as YAML (for ``kubectl apply -f -``)."""
    sys.stdout.write(yaml.safe_dump_all(stage_status_policy(), sort_keys=False, width=120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
