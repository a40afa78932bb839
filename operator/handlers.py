"""kopf wiring, and nothing else: one daemon per DistillationRun runs the reconcile loop.

The daemon reconciles (in a worker thread: the API client is synchronous), then sleeps until an event on
the run or on one of its Jobs, Deployments, Pods or PersistentVolumeClaims wakes it, a due retry or
deadline (``Decision.requeue_after``), or the resync (OPD_RESYNC_SECONDS, default 60 s). Everything that
changes a run's state is one of those events, so the resync is only a safety net (a missed watch event,
an object changed behind the operator's back) and an idle run costs one reconcile — a GET and a LIST of
each child kind — per resync, not per few seconds. A pod that cannot be scheduled or pulled wakes the
run at once (its Stalled condition shows within a second or two). A round woken by an event reads the
children from kopf's index (``run_children``, cache.py) instead of LISTing them; the first round and each
resync LIST.

A finished run (Succeeded or Failed for its current spec, ttl.settled) has no daemon: kopf stops it when
the status says so and starts it again when the spec is edited (the daemon's filter), so finished runs
cost no API request however many there are. A finished run's ``ttlSecondsAfterFinished`` is one timer in
the event loop (``_schedule_ttl``), not a task per run; when it fires, one reconcile deletes the run's
children (ttl.expire).

kopf watches the children kinds with a server-side label selector (the operator's
``app.kubernetes.io/managed-by``), so a shared cluster's other pods never reach the operator. kopf
restarts the daemons of existing runs when the operator starts again, so a restart simply continues.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from opd_runtime.contract import DEFAULT_CONTROLLER, GROUP, PLURAL, VERSION

from . import cache, driver, leader, metrics, names, ttl
from .kube import RESOURCES, RestApi
from .observe import KINDS

log = logging.getLogger("opd_operator")
RESYNC_SECONDS = float(os.environ.get("OPD_RESYNC_SECONDS", "60"))
METRICS_PORT = int(os.environ.get("OPD_METRICS_PORT", "8000"))
# This operator acts only on runs whose spec.managedBy names it (unset: the default name); see driver.manages.
CONTROLLER_NAME = os.environ.get("OPD_CONTROLLER_NAME") or DEFAULT_CONTROLLER
# ttlSecondsAfterFinished of runs that set none (the chart's operator.ttlSecondsAfterFinished); unset: none
DEFAULT_TTL = (
    int(os.environ["OPD_TTL_SECONDS_AFTER_FINISHED"]) if os.environ.get("OPD_TTL_SECONDS_AFTER_FINISHED") else None
)
CHILD_LABELS: dict[str, Any] = {names.RUN_LABEL: kopf.PRESENT, "app.kubernetes.io/managed-by": names.MANAGER}
# The children kinds kopf watches (server-side selected by label) and indexes: (group, version, plural).
WATCHED_CHILDREN = tuple(
    ("" if prefix == "/api/v1" else prefix.split("/")[2], prefix.split("/")[-1], plural)
    for prefix, plural in (RESOURCES[kind] for kind in KINDS)
)

_wakers: dict[tuple[str, str], asyncio.Event] = {}
_ttl_timers: dict[tuple[str, str], tuple[datetime, asyncio.TimerHandle]] = {}
_api: RestApi | None = None


def api() -> RestApi:
    global _api
    if _api is None:
        _api = RestApi(timeout=leader.request_timeout(30.0))
    return _api


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = names.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="opd.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="opd.dev", key="last-handled-configuration"
    )
    settings.posting.enabled = False  # the reconciler posts its own, meaningful Events
    settings.watching.server_timeout = 300
    for group, _version, plural in WATCHED_CHILDREN:  # server-side: only the operator's own children are streamed
        settings.watching.label_selectors[group, plural] = f"app.kubernetes.io/managed-by={names.MANAGER}"
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not "Handler ... succeeded" per event
    if METRICS_PORT:
        metrics.serve(METRICS_PORT)
    api()


def _wake(namespace: str | None, name: str | None) -> None:
    event = _wakers.get((namespace or "", name or ""))
    if event is not None:
        event.set()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_changed(namespace: str | None, name: str, body: kopf.Body, type: str | None, **_: Any) -> None:
    key = (namespace or "", name)
    obj = dict(body)
    if type == "DELETED" or not driver.manages(obj, CONTROLLER_NAME):
        _cancel_ttl(key)
        metrics.forget(*key)
        return
    _wake(namespace, name)
    if ttl.settled(obj):  # no daemon reports a finished run's phase: its status is what the watch shows
        status = obj.get("status") or {}
        metrics.set_phase(key[0], name, status.get("phase"))
        metrics.set_eval_score(key[0], name, status.get("evalScore"))
    _schedule_ttl(key, ttl.pending(obj, DEFAULT_TTL))


def _cancel_ttl(key: tuple[str, str]) -> None:
    timer = _ttl_timers.pop(key, None)
    if timer is not None:
        timer[1].cancel()


def _schedule_ttl(key: tuple[str, str], due: datetime | None) -> None:
    """(Re)arm the one timer of a finished run whose children are due for deletion at ``due``."""
    if due is None:
        _cancel_ttl(key)
        return
    if key in _ttl_timers and _ttl_timers[key][0] == due:
        return
    _cancel_ttl(key)
    loop = asyncio.get_running_loop()
    delay = max(0.0, (due - datetime.now(UTC)).total_seconds())
    _ttl_timers[key] = (due, loop.call_later(delay, lambda: asyncio.ensure_future(_expire(key))))


async def _expire(key: tuple[str, str]) -> None:
    """The TTL passed: one reconcile deletes the children (it re-reads the run: an edit since wins)."""
    _ttl_timers.pop(key, None)
    await asyncio.to_thread(driver.reconcile_safely, api(), *key, None, CONTROLLER_NAME, DEFAULT_TTL)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "persistentvolumeclaims", labels=CHILD_LABELS)
async def child_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _wake(namespace, labels.get(names.RUN_LABEL))


def run_children(
    namespace: str | None, labels: Mapping[str, str], body: kopf.Body, resource: kopf.Resource, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """kopf's index of the runs' children (cache.py): (namespace, run) -> {kind, body} per object, for
    every kind in ``observe.KINDS``. kopf starts no daemon before it holds the initial listing of each."""
    return {(namespace or "", labels[names.RUN_LABEL]): {"kind": resource.kind, "body": copy.deepcopy(dict(body))}}


for _group, _version, _plural in WATCHED_CHILDREN:  # registers the same index for every kind
    kopf.index(_group, _version, _plural, labels=CHILD_LABELS)(run_children)


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> bool:
    """Wait for a wake-up, the daemon's stop or ``seconds``; True when an event woke it."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    woken = wake.is_set()
    wake.clear()
    return woken


def active(body: kopf.Body, **_: Any) -> bool:
    """A run of this operator (spec.managedBy) that has not finished for its current spec: kopf starts no
    daemon for another's (and so puts no finalizer on it), and stops a run's daemon once it has finished."""
    obj = dict(body)
    return driver.manages(obj, CONTROLLER_NAME) and not ttl.settled(obj)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0, when=active)
async def reconcile_run(namespace: str | None, name: str, stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
    """The run's loop. A round woken by an event reads the children from the index; the first round and
    every resync LIST them (the truth: it also corrects anything the watches might have missed)."""
    assert namespace is not None  # DistillationRuns are namespaced
    index: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["run_children"]  # kopf passes indexes by name
    wake = _wakers.setdefault((namespace, name), asyncio.Event())
    indexed: cache.Children | None = None
    try:
        while not stopped:
            delay = await asyncio.to_thread(
                driver.reconcile_safely, api(), namespace, name, indexed, CONTROLLER_NAME, DEFAULT_TTL
            )
            wait = RESYNC_SECONDS if delay is None else min(RESYNC_SECONDS, max(0.5, delay))
            woken = await _sleep(wake, stopped, wait)
            # copied here, in the event loop that updates the index, not in the reconcile's thread
            indexed = cache.from_index(index.get((namespace, name), [])) if woken else None
    finally:
        _wakers.pop((namespace, name), None)
        cache.OVERLAY.forget(namespace, name)
