"""kopf wiring, and nothing else: one daemon per DistillationRun runs the reconcile loop.

The daemon reconciles (in a worker thread: the API client is synchronous), then sleeps until the next
resync, a due retry, or an event on the run or on one of its Jobs/Deployments wakes it. kopf restarts
the daemons of existing runs when the operator starts again, so a restart simply continues.
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
RESYNC_SECONDS = float(os.environ.get("OPD_RESYNC_SECONDS", "10"))
METRICS_PORT = int(os.environ.get("OPD_METRICS_PORT", "8000"))
CHILD_LABELS: dict[str, Any] = {names.RUN_LABEL: kopf.PRESENT, "app.kubernetes.io/managed-by": names.MANAGER}

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
