"""The state of one reconcile of one run, and what it decides: actions, status, events (pure).

``WalkState`` holds the run, what was observed and the decision being built, with the small steps every
part of the walk uses (conditions, events, creates and deletes, stage records, requeues). The teacher's
lifecycle (teacher.py) and the batch stages and the run as a whole (reconcile.py) build on it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from opd_runtime.spec import DistillationRun

from . import children, conditions
from .observe import Observed, Waiting, parse_time

Manifest = dict[str, Any]
MAX_BACKOFF_SECONDS = 600


@dataclass(frozen=True)
class Action:
    verb: Literal["create", "delete", "patch"]
    kind: str
    name: str
    body: Manifest | None = None  # the object (create) or a merge patch (patch)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    outcome: Literal["succeeded", "failed"]
    seconds: float


@dataclass
class Decision:
    actions: list[Action] = field(default_factory=list)
    status: Manifest = field(default_factory=dict)  # the whole status except `progress`
    events: list[Event] = field(default_factory=list)
    outcomes: list[StageOutcome] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until something is due (a retry's back-off)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def backoff_seconds(base: int, failures: int) -> float:
    return float(min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, failures - 1)))


class WalkState:
    """One reconcile of one run: its inputs, the status and decision being built, and the common steps."""

    def __init__(self, obj: Manifest, run: DistillationRun, observed: Observed, now: datetime):
        self.obj, self.run, self.observed, self.now = obj, run, observed, now
        self.name = obj["metadata"]["name"]
        self.generation = obj["metadata"].get("generation")
        self.old: Manifest = obj.get("status") or {}
        status = copy.deepcopy(self.old)
        status.pop("progress", None)
        status.pop("childrenDeletedTime", None)  # the walk makes the run's children again (ttl.py)
        self.status = status
        self.stages: Manifest = status.setdefault("stages", {})
        self.conds: list[Manifest] = status.get("conditions") or []
        self.d = Decision()
        self.planned = children.operator_stages(run)  # a sidecar teacher is the distill pods' business
        self.stalled: tuple[str, Waiting] | None = None  # (stage, why) when the current stage's pods are stuck
        self.failed_stage: str | None = None  # "teacher" when the teacher's retries are used up
        # the stage's pods are gone or going (a deadline stops them): Stalled keeps what it said, so the
        # failure can name what the attempt waited for
        self.keep_stall = False
        self.admission: tuple[str, str] | None = None  # (Admitted/Queued/Evicted, message) of the current stage

    # ---- helpers ---------------------------------------------------------------------------------
    def ts(self) -> str:
        return rfc3339(self.now)

    def cond(self, type_: str, value: bool | None, reason: str, message: str = "") -> None:
        self.conds = conditions.set_condition(
            self.conds, type_, value, reason, message, now=self.ts(), generation=self.generation
        )

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.d.events.append(Event(type_, reason, message))

    def create(self, manifest: Manifest) -> None:
        self.d.actions.append(Action("create", manifest["kind"], manifest["metadata"]["name"], manifest))

    def delete(self, kind: str, name: str) -> None:
        self.d.actions.append(Action("delete", kind, name))

    def stage(self, name: str) -> Manifest:
        stage: Manifest = self.stages.setdefault(name, {"phase": "Pending", "attempts": 0, "failures": 0})
        return stage

    def old_stage_phase(self, name: str) -> str | None:
        return ((self.old.get("stages") or {}).get(name) or {}).get("phase")

    def requeue(self, seconds: float) -> None:
        """Reconcile again within ``seconds`` (a back-off or a deadline is due then)."""
        wait = max(0.5, seconds)
        self.d.requeue_after = wait if self.d.requeue_after is None else min(self.d.requeue_after, wait)

    def retry_wait(self, ss: Manifest) -> float:
        """Seconds until the next attempt of a stage (or the teacher) that failed is due: its last failure
        plus the back-off for its failures (``backoff_seconds``); 0 or less when due."""
        due = parse_time(ss.get("lastFailureTime")) or self.now
        due += timedelta(seconds=backoff_seconds(self.run.spec.backoff_seconds, ss["failures"]))
        return (due - self.now).total_seconds()

    def seconds_since(self, start: str | None) -> float:
        begun = parse_time(start)
        return max(0.0, (self.now - begun).total_seconds()) if begun else 0.0
