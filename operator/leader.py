"""Leader election over a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

Why a Lease and not kopf's peering: kopf peering is presence, not a lock. Peers post keep-alives into a
KopfPeering object (its own CRD) every ``settings.peering.lifetime`` (60 s by default) and a peer pauses
while one of *higher* priority is alive; by kopf's documentation, peers of *equal* priority — two replicas
of one Deployment — all warn and freeze, leaving the cluster unserved, so replicas would need distinct
priorities (a standby then resumes only once the other's keep-alive has expired), and two peers starting
at once each see nobody for a moment. A Lease update carries ``metadata.resourceVersion``, so of two
candidates racing for an expired Lease the API server lets exactly one write win (the other gets 409) —
the lock every Kubernetes controller (kube-controller-manager, controller-runtime) uses.

How it runs (operator/__main__.py): a candidate does nothing but read the Lease every ``retry_period``
until it holds it; only then does it start kopf (watches, daemons, writes). So a standby makes no
write and keeps no watch. The leader renews every ``retry_period`` in a thread; when it has not renewed
for ``renew_deadline`` (API unreachable, another holder) it exits at once (exit code 1, as client-go's
users do with ``OnStoppedLeading``): nothing acts after losing. ``ensure_leading`` is the same check at the
moment of writing, so a leader whose renew thread is stuck stops before its Lease can pass to another.
A candidate sees the Lease expired when its record (holder, renew time, resourceVersion) has not changed
for ``lease_duration`` on the candidate's own monotonic clock — never comparing two machines' clocks.
A leader stopped by SIGTERM releases the Lease (holder emptied), so its successor starts within one
``retry_period``; a leader that dies outright is replaced within ``lease_duration`` + ``retry_period``.

Timings (client-go's defaults): lease 15 s, renew deadline 10 s, retry 2 s; they must satisfy
lease_duration > renew_deadline > retry_period, so the old leader has stopped ``lease_duration -
renew_deadline`` seconds before anyone may take over.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from . import metrics
from .kube import ApiError, RestApi, path

log = logging.getLogger("opd_operator")
Manifest = dict[str, Any]
EXIT_LOST = 1  # the process exits with this code when it loses the Lease; the kubelet restarts it
SERVICEACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class LeaseSettings:
    """Where the Lease is and how long it lasts (seconds)."""

    namespace: str
    name: str = "opd-operator"
    identity: str = ""  # empty: <hostname>_<random>, unique per process
    lease_duration: float = 15.0  # a holder that has not renewed for this long may be replaced
    renew_deadline: float = 10.0  # the leader gives up (exits) when it has not renewed for this long
    retry_period: float = 2.0  # candidates retry and the leader renews this often

    def __post_init__(self) -> None:
        if not (self.lease_duration > self.renew_deadline > self.retry_period > 0):
            raise ValueError(
                f"leader election timings must satisfy lease duration ({self.lease_duration}) > renew deadline "
                f"({self.renew_deadline}) > retry period ({self.retry_period}) > 0: the old leader must stop "
                "before another may take over; fix --leader-elect-lease-duration/-renew-deadline/-retry-period"
            )
        if self.lease_duration < 1:
            raise ValueError("--leader-elect-lease-duration: at least 1 second (a Lease counts whole seconds)")


def default_namespace() -> str | None:
    """The operator pod's own namespace: POD_NAMESPACE (downward API), else the ServiceAccount's."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICEACCOUNT_NAMESPACE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _exit_lost() -> NoReturn:
    logging.shutdown()
    os._exit(EXIT_LOST)


class LeaderElector:
    """Acquire, renew and release one Lease for this process."""

    def __init__(
        self, settings: LeaseSettings, api: RestApi | None = None, on_lost: Callable[[], NoReturn] | None = None
    ):
        self.settings = settings
        # what losing the Lease does: end the process at once (no cleanup that could still write)
        self.on_lost = on_lost or _exit_lost
        self.identity = settings.identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        # each request must end well before the renew deadline, or a hung request would outlive it
        self.api = api or RestApi(timeout=max(1.0, settings.renew_deadline / 2))
        self.path = path("Lease", settings.namespace, settings.name)
        self._observed: tuple[Any, ...] | None = None  # the last Lease record seen
        self._observed_at = 0.0  # monotonic time it was first seen
        self._renewed_at: float | None = None  # monotonic time of our last successful acquire/renew
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- one attempt ---------------------------------------------------------------------------------
    def _spec(self, old: Manifest | None) -> Manifest:
        now = micro_time(datetime.now(UTC))
        old = old or {}
        mine = old.get("holderIdentity") == self.identity
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.settings.lease_duration),  # whole seconds, never shorter
            "acquireTime": old.get("acquireTime") if mine and old.get("acquireTime") else now,
            "renewTime": now,
            "leaseTransitions": int(old.get("leaseTransitions") or 0) + (0 if mine else 1),
        }

    def try_acquire_or_renew(self) -> bool:
        """One round of client-go's tryAcquireOrRenew: True when this process holds the Lease now."""
        lease = self.api.request("GET", self.path, ok_missing=True)
        now = time.monotonic()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.settings.name, "namespace": self.settings.namespace},
                "spec": {**self._spec(None), "leaseTransitions": 0},
            }
            try:
                self.api.request("POST", path("Lease", self.settings.namespace), body)
            except ApiError as err:
                if err.status == 409:  # another candidate created it first
                    return False
                raise
            self._renewed_at = now
            return True
        spec = lease.get("spec") or {}
        record = (spec.get("holderIdentity"), spec.get("renewTime"), lease["metadata"].get("resourceVersion"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        holder = spec.get("holderIdentity")
        duration = float(spec.get("leaseDurationSeconds") or self.settings.lease_duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by another, and renewed within its duration as far as we have seen
        lease["spec"] = self._spec(spec)
        try:
            self.api.request("PUT", self.path, lease)  # carries resourceVersion: one racer wins, others 409
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        self._renewed_at = now
        return True

    # ---- the life cycle ------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Block until this process holds the Lease (retrying every ``retry_period``)."""
        where = f"{self.settings.namespace}/{self.settings.name}"
        log.info("leader election: %s waits for Lease %s", self.identity, where)
        while True:
            try:
                if self.try_acquire_or_renew():
                    break
            except (ApiError, OSError) as err:
                log.warning("leader election: could not read or take the Lease: %s", err)
            time.sleep(self.settings.retry_period)
        metrics.LEADER.set(1)
        log.info("leader election: %s now leads (Lease %s)", self.identity, where)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.settings.retry_period):
            try:
                self.try_acquire_or_renew()
            except (ApiError, OSError) as err:
                log.warning("leader election: renewing the Lease failed: %s", err)
            self.ensure_leading()

    def leading(self, request_seconds: float = 0.0) -> bool:
        """Renewed within ``renew_deadline``, and a request that starts now and takes up to
        ``request_seconds`` ends before another candidate may take the Lease (``lease_duration`` after our
        last renewal): a write must never land once another leader may be acting."""
        renewed = self._renewed_at
        if renewed is None:
            return False
        since = time.monotonic() - renewed
        return since < self.settings.renew_deadline and since + request_seconds < self.settings.lease_duration

    def write_timeout(self) -> float:
        """How long one of the leader's requests may take: half the time from the renewal before last to
        the Lease's expiry, so a write that starts as late as ``leading`` allows still ends in time."""
        return (self.settings.lease_duration - self.settings.retry_period) / 2

    def ensure_leading(self, request_seconds: float = 0.0) -> None:
        """Exit the process at once unless ``leading(request_seconds)``."""
        if self._stop.is_set() or self.leading(request_seconds):
            return
        log.critical(
            "leader election: Lease %s/%s not renewed for %.0fs; exiting so that nothing acts without it",
            self.settings.namespace,
            self.settings.name,
            self.settings.renew_deadline,
        )
        self.on_lost()

    def release(self) -> None:
        """Stop renewing and hand the Lease back (holder emptied), so a standby takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.renew_deadline)
        metrics.LEADER.set(0)
        try:
            lease = self.api.request("GET", self.path, ok_missing=True)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = micro_time(datetime.now(UTC))
            lease["spec"].update(holderIdentity=None, leaseDurationSeconds=1, renewTime=now, acquireTime=now)
            self.api.request("PUT", self.path, lease)
            log.info("leader election: %s released the Lease", self.identity)
        except (ApiError, OSError) as err:  # it expires by itself within lease_duration
            log.warning("leader election: could not release the Lease: %s", err)


_current: LeaderElector | None = None


def set_current(elector: LeaderElector | None) -> None:
    global _current
    _current = elector


def ensure_leading(request_seconds: float = 0.0) -> None:
    """Called before each write (one request of up to ``request_seconds``): a no-op without leader
    election, else exits unless the write ends before the Lease could pass to another."""
    if _current is not None:
        _current.ensure_leading(request_seconds)


def request_timeout(default: float) -> float:
    """The operator's request timeout: ``default`` without leader election, else the elector's
    ``write_timeout`` (a 30 s request would outlive a 15 s Lease)."""
    return default if _current is None else min(default, _current.write_timeout())
