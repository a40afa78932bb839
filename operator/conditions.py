"""Status conditions: set one, keeping ``lastTransitionTime`` unless its status actually changes."""

from __future__ import annotations

from typing import Any

Conditions = list[dict[str, Any]]

READY = "Ready"
FAILED = "Failed"
SUSPENDED = "Suspended"
SPEC_ACCEPTED = "SpecAccepted"
TEACHER_READY = "TeacherReady"
# True while the current stage's pods cannot start (unschedulable, image pull, unbound claim, config error);
# present once it has been True.
STALLED = "Stalled"
# With a Kueue queue (spec.queueName): True once Kueue admitted the current stage's workload, False while it
# waits in the queue (reason Queued) or after Kueue evicted it (reason Evicted); absent without a queue.
ADMITTED = "Admitted"
# Per-stage condition types, e.g. SftSucceeded.
STAGE_CONDITIONS = {
    "sft": "SftSucceeded",
    "teacher": TEACHER_READY,
    "distill": "DistillSucceeded",
    "eval": "EvalSucceeded",
}


def get(conditions: Conditions, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def set_condition(
    conditions: Conditions,
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> Conditions:
    """A copy of ``conditions`` with ``type_`` set (``status`` None = Unknown)."""
    value = "Unknown" if status is None else ("True" if status else "False")
    old = get(conditions, type_)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") else now
    new = {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": since}
    if generation is not None:
        new["observedGeneration"] = generation
    out = [c for c in conditions if c.get("type") != type_]
    out.append(new)
    order = [READY, FAILED, STALLED, ADMITTED, SUSPENDED, SPEC_ACCEPTED, *STAGE_CONDITIONS.values()]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else len(order))
