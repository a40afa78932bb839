"""kopf wiring, and nothing else: one daemon per DistillationRun runs the reconcile loop.

The daemon reconciles (in a worker thread: the API client is synchronous), then sleeps until an event on
the run or on one of its Jobs, Deployments, Pods or PersistentVolumeClaims wakes it, a due retry or
deadline (``Decision.requeue_after``), or the resync (OPD_RESYNC_SECONDS, default 60 s). Everything that
changes a run's state is one of those events, so the resync is only a safety net (a missed watch event,
an object changed behind the operator's back) and an idle run costs one reconcile — a GET and a LIST of
each child kind — per resync, not per few seconds. A pod that cannot be scheduled or pulled wakes the
run at once (its Stalled condition shows within a second or two).

kopf watches the children kinds with a server-side label selector (the operator's
``app.kubernetes.io/managed-by``), so a shared cluster's other pods never reach the operator. kopf
restarts the daemons of existing runs when the operator starts again, so a restart simply continues.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from opd_runtime.contract import GROUP, PLURAL, VERSION

from . import driver, metrics, names
from .kube import RestApi

log = logging.getLogger("opd_operator")
RESYNC_SECONDS = float(os.environ.get("OPD_RESYNC_SECONDS", "60"))
METRICS_PORT = int(os.environ.get("OPD_METRICS_PORT", "8000"))
CHILD_LABELS: dict[str, Any] = {names.RUN_LABEL: kopf.PRESENT, "app.kubernetes.io/managed-by": names.MANAGER}
# The children kinds whose events wake their run: (group, plural) as kopf names them.
WATCHED_CHILDREN = (("batch", "jobs"), ("apps", "deployments"), ("", "pods"), ("", "persistentvolumeclaims"))

_wakers: dict[tuple[str, str], asyncio.Event] = {}
_api: RestApi | None = None


def api() -> RestApi:
    global _api
    if _api is None:
        _api = RestApi()
    return _api


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "opd.dev/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="opd.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="opd.dev", key="last-handled-configuration"
    )
    settings.posting.enabled = False  # the reconciler posts its own, meaningful Events
    settings.watching.server_timeout = 300
    for group, plural in WATCHED_CHILDREN:  # server-side: only the operator's own children are streamed
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
async def run_changed(namespace: str | None, name: str, **_: Any) -> None:
    _wake(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "persistentvolumeclaims", labels=CHILD_LABELS)
async def child_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    _wake(namespace, labels.get(names.RUN_LABEL))


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    wake.clear()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def reconcile_run(namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
    assert namespace is not None  # DistillationRuns are namespaced
    wake = _wakers.setdefault((namespace, name), asyncio.Event())
    try:
        while not stopped:
            delay = await asyncio.to_thread(driver.reconcile_safely, api(), namespace, name)
            wait = RESYNC_SECONDS if delay is None else min(RESYNC_SECONDS, max(0.5, delay))
            await _sleep(wake, stopped, wait)
    finally:
        _wakers.pop((namespace, name), None)
        metrics.forget(namespace, name)
