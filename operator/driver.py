"""One reconcile of one run against the API: read, decide (pure), act, write status, post events."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from opd_runtime.contract import DEFAULT_CONTROLLER

from . import leader, metrics, ttl
from .cache import OVERLAY, Children
from .conditions import READY, set_condition
from .kube import Api, ApiError, apply_action, list_children, post_event
from .observe import clip, failed_create, observe, podless_jobs, unlisted_claims
from .reconcile import decide
from .walk import Decision, Event, rfc3339

log = logging.getLogger("opd_operator")
Manifest = dict[str, Any]


def without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new`` (None when equal); ``new`` holds no
    None values (a null in a merge patch deletes the key)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else new
    patch: Manifest = dict.fromkeys(old.keys() - new.keys())
    for key, value in new.items():
        sub = merge_patch(old[key], value) if key in old else value
        if sub is not None:
            patch[key] = sub
    return patch or None


def manages(obj: Manifest, controller: str = DEFAULT_CONTROLLER) -> bool:
    """Whether the operator named ``controller`` acts on run ``obj`` (its ``spec.managedBy``; unset means
    the default controller)."""
    return ((obj.get("spec") or {}).get("managedBy") or DEFAULT_CONTROLLER) == controller


def reconcile_once(
    api: Api,
    namespace: str,
    name: str,
    now: datetime | None = None,
    indexed: Children | None = None,
    controller: str = DEFAULT_CONTROLLER,
    default_ttl: int | None = None,
) -> Decision | None:
    """Reconcile run ``namespace/name``; None when it is gone, being deleted (its children go with it) or
    managed by another controller (``spec.managedBy``). ``indexed``: the children as the watches saw them
    (cache.py); None LISTs them. ``default_ttl``: ttlSecondsAfterFinished of runs that set none (ttl.py)."""
    now = now or datetime.now(UTC)
    obj = api.get("DistillationRun", namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp") or not manages(obj, controller):
        OVERLAY.forget(namespace, name)
        return None
    if indexed is None:
        found = list_children(api, namespace, name)
        OVERLAY.forget(namespace, name)  # the LIST is the truth: nothing of ours is pending any more
    else:
        found = OVERLAY.apply(namespace, name, indexed)
    claims = [c for c in (api.get("PersistentVolumeClaim", namespace, n) for n in unlisted_claims(found)) if c]
    expiry = ttl.due(obj, default_ttl)
    refused = [
        why
        for job in podless_jobs(found, now)
        if (why := failed_create(job, api.list("Event", namespace, "", f"involvedObject.uid={job['metadata']['uid']}")))
    ]
    observed = observe(name, found, claims, refused)
    decision = ttl.expire(obj, observed, now) if expiry is not None and now >= expiry else decide(obj, observed, now)
    old = {k: v for k, v in (obj.get("status") or {}).items() if k != "progress"}
    # With leader election each write is checked on its own: a batch of writes may take longer than the
    # margin between our last renewal and another candidate's takeover.
    write_seconds = float(getattr(api, "timeout", 0.0))
    for action in decision.actions:
        leader.ensure_leading(write_seconds)
        try:
            apply_action(api, namespace, action)
            OVERLAY.record(namespace, name, action)
        except ApiError as err:  # e.g. admission refused a pod spec, or a quota: say so on the run
            report_refusal(api, obj, old, f"{action.verb} {action.kind} {action.name}: {err}", now, err.reason)
            raise
    patch = merge_patch(old, without_none(decision.status))
    leader.ensure_leading(write_seconds)
    if patch:
        api.patch("DistillationRun", namespace, name, {"status": patch}, subresource="status")
    for event in decision.events:
        leader.ensure_leading(write_seconds)
        post_event(api, obj, event, rfc3339(now))
        log.info("%s/%s: %s: %s", namespace, name, event.reason, event.message)
    for outcome in decision.outcomes:
        metrics.observe_stage(outcome.stage, outcome.outcome, outcome.seconds)
    metrics.set_phase(namespace, name, decision.status.get("phase"))
    metrics.set_eval_score(namespace, name, decision.status.get("evalScore"))
    return decision


def report_refusal(
    api: Api, obj: Manifest, old: Manifest, message: str, now: datetime, reason: str = "ReconcileError"
) -> None:
    """The API refused an action: keep the status as it was (the next round retries the same step) but
    for Ready=False/``reason`` with the API's message, and one Warning event per new message."""
    conds = set_condition(
        old.get("conditions") or [],
        READY,
        False,
        reason,
        clip(message),
        now=rfc3339(now),
        generation=obj["metadata"].get("generation"),
    )
    meta = obj["metadata"]
    leader.ensure_leading(float(getattr(api, "timeout", 0.0)))
    api.patch(
        "DistillationRun",
        meta["namespace"],
        meta["name"],
        {"status": {"message": clip(message), "conditions": conds}},
        subresource="status",
    )
    if old.get("message") != clip(message):
        post_event(api, obj, Event("Warning", reason, message), rfc3339(now))


def reconcile_safely(
    api: Api,
    namespace: str,
    name: str,
    indexed: Children | None = None,
    controller: str = DEFAULT_CONTROLLER,
    default_ttl: int | None = None,
) -> float | None:
    """``reconcile_once`` that counts and logs errors instead of raising; returns the requeue delay."""
    metrics.RECONCILES.inc()
    try:
        decision = reconcile_once(api, namespace, name, indexed=indexed, controller=controller, default_ttl=default_ttl)
    except Exception:  # the next round retries; the error is counted and logged with its traceback
        metrics.RECONCILE_ERRORS.inc()
        log.exception("reconcile of %s/%s failed", namespace, name)
        return None
    return decision.requeue_after if decision else None
