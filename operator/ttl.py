"""Finished runs: when one is settled (needs no reconcile until it is edited), and deleting its children
once ``spec.ttlSecondsAfterFinished`` has passed (pure).

A run is settled when its status says Succeeded or Failed for the spec it has now (``observedGeneration``
equals ``metadata.generation``): nothing of it runs, and only an edit (a new generation) or its deletion
can change what it needs. The operator keeps no loop for a settled run (handlers.py), so it costs no API
request; an edit brings the loop back.

The TTL counts from ``status.completionTime``. What it deletes is the run's machinery: Jobs (their pods
with them), the teacher Deployment and Services, the NetworkPolicy, the run file ConfigMap and the stage
ServiceAccount, Role and RoleBinding. The run stays, with its status. The workspace PVC goes only when its
retention policy is Delete (the policy that ties the workspace's life to the run's children); an
existingClaim is never the operator's to delete.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

from . import names
from .observe import Observed, parse_time
from .walk import Action, Decision, Event, rfc3339

Manifest = dict[str, Any]
FINISHED = ("Succeeded", "Failed")
TTL_FIELD = "ttlSecondsAfterFinished"
# Children the TTL deletes, in this order: what runs first, what it reads last. Pods go with their Job.
DELETED_KINDS = (
    "Job",
    "Deployment",
    "Service",
    "NetworkPolicy",
    "ConfigMap",
    "RoleBinding",
    "Role",
    "ServiceAccount",
    "PersistentVolumeClaim",
)


def settled(obj: Manifest) -> bool:
    """Whether run ``obj`` has finished (Succeeded or Failed) for its current spec."""
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    return status.get("phase") in FINISHED and generation is not None and status.get("observedGeneration") == generation


def ttl_seconds(obj: Manifest, default: int | None) -> int | None:
    """The run's ``spec.ttlSecondsAfterFinished``, else the operator's ``default`` (None: keep forever).
    Read from the raw spec, so a run the models reject (Failed: InvalidSpec) still has its TTL."""
    value = (obj.get("spec") or {}).get(TTL_FIELD)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


def due(obj: Manifest, default: int | None) -> datetime | None:
    """When the settled run's children are due for deletion; None when it is not settled, keeps them
    forever, or has no completion time."""
    if not settled(obj):
        return None
    seconds = ttl_seconds(obj, default)
    finished = parse_time((obj.get("status") or {}).get("completionTime"))
    if seconds is None or finished is None:
        return None
    return finished + timedelta(seconds=seconds)


def pending(obj: Manifest, default: int | None) -> datetime | None:
    """``due``, for a run whose children have not been deleted yet (what the operator schedules)."""
    return None if (obj.get("status") or {}).get("childrenDeletedTime") else due(obj, default)


def deletions(obj: Manifest, observed: Observed) -> list[tuple[str, str]]:
    """(kind, name) of each child the TTL deletes that still exists, in ``DELETED_KINDS`` order."""
    run = obj["metadata"]["name"]
    workspace = (obj.get("spec") or {}).get("workspace") or {}
    drop_workspace = workspace.get("retentionPolicy") == "Delete" and not workspace.get("existingClaim")
    out = []
    for kind in DELETED_KINDS:
        for present_kind, name in sorted(observed.present):
            if present_kind != kind:
                continue
            if kind == "PersistentVolumeClaim" and not (drop_workspace and name == names.workspace_claim(run)):
                continue
            out.append((kind, name))
    return out


def expire(obj: Manifest, observed: Observed, now: datetime) -> Decision:
    """Delete what is left of a settled run whose TTL has passed; the status keeps everything it said and
    gains ``childrenDeletedTime``. Idempotent: a repeat deletes only what is still there, posts no Event."""
    deleted = deletions(obj, observed)
    status = {k: v for k, v in copy.deepcopy(obj.get("status") or {}).items() if k != "progress"}
    first = not status.get("childrenDeletedTime")
    status.setdefault("childrenDeletedTime", rfc3339(now))
    events = []
    if first:
        set_ttl = (obj.get("spec") or {}).get(TTL_FIELD) is not None
        what = ", ".join(f"{kind} {name}" for kind, name in deleted) or "nothing left"
        workspace = status.get("workspaceClaim")
        kept = workspace and ("PersistentVolumeClaim", workspace) not in deleted
        events.append(
            Event(
                "Normal",
                "ChildrenDeleted",
                f"{'spec.' + TTL_FIELD if set_ttl else 'the operator default ttlSecondsAfterFinished'} passed since "
                f"the run finished: deleted {what}"
                + (f"; the workspace PVC {workspace} is kept (workspace.retentionPolicy)" if kept else ""),
            )
        )
    return Decision(actions=[Action("delete", kind, name) for kind, name in deleted], status=status, events=events)
