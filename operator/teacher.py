"""The teacher's lifecycle within a reconcile: its Deployment and Service created, waited for (Kueue
admission, readiness deadline), retried after the back-off, failed, stopped or dropped (pure)."""

from __future__ import annotations

from typing import Literal

from . import children, conditions, names
from .observe import clip
from .walk import Manifest, WalkState


class TeacherSteps(WalkState):
    """The teacher's part of a reconcile (reconcile._Walk adds the batch stages and the run as a whole)."""

    def stop_teacher(self, reason: str) -> None:
        teacher = self.observed.teacher
        if teacher is not None and not teacher.deleting:
            self.delete("Deployment", names.teacher(self.name))
            if reason == "Finished":
                self.event("Normal", "TeacherStopped", "Distillation finished; the teacher server is removed")
        if self.observed.has("Service", names.teacher(self.name)):
            self.delete("Service", names.teacher(self.name))
        if "teacher" in self.planned:
            ts = self.stage("teacher")
            if ts.get("phase") == "Failed":
                return  # its condition says why (TeacherTimeout)
            if ts.get("phase") in ("Running", "Waiting"):
                ts["phase"] = "Succeeded" if reason == "Finished" else "Pending"
                if reason == "Finished":
                    ts["completionTime"] = self.ts()
            self.cond(
                conditions.TEACHER_READY,
                False,
                "Stopped" if reason == "Finished" else reason,
                "The teacher server is not running.",
            )

    def drop_unplanned_teacher(self) -> None:
        """An edit took the teacher out of the plan (``serving.url``, objective ``rl``, backend ``local``):
        its GPUs are freed once no distill attempt that may still call it runs (one started with the previous
        spec keeps it until it ends)."""
        if any(j.stage == "distill" and j.state == "active" and not j.deleting for j in self.observed.jobs):
            return
        if self.observed.live_pods.get("distill"):
            return
        if self.observed.teacher is not None and not self.observed.teacher.deleting:
            self.event("Normal", "TeacherStopped", "The spec no longer serves a teacher; the teacher server is removed")
        self.stop_teacher(reason="NotPlanned")
        self.stages.pop("teacher", None)
        self.conds = [c for c in self.conds if c.get("type") != conditions.TEACHER_READY]

    def teacher_ready(self) -> Literal["ready", "waiting", "failed"]:
        """Ensure a teacher Deployment serving the accepted spec and its Service exist: "ready" once it is
        Available; "failed" once it has missed ``readyTimeoutSeconds`` more than ``spec.retries`` times."""
        state = self.teacher_deployment()
        if state != "failed" and not self.observed.has("Service", names.teacher(self.name)):
            self.create(children.teacher_service(self.obj, self.run))
        return state

    def teacher_deployment(self) -> Literal["ready", "waiting", "failed"]:
        ts = self.stage("teacher")
        teacher = self.observed.teacher
        name = names.teacher(self.name)
        retries = self.run.spec.retries
        if ts.get("phase") == "Failed":
            self.failed_stage = "teacher"
            return "failed"
        if teacher is not None and teacher.deleting:
            return self.teacher_waiting(f"waiting for the previous teacher Deployment {name} to go")
        if teacher is not None and not children.same_spec(teacher.spec_hash, self.run):
            # It serves an older run file (the spec changed while no Job ran): a learner started now would
            # read the new file and score against the old teacher. Replace it; the learner waits.
            self.delete("Deployment", name)
            self.event("Normal", "TeacherRestarted", f"The spec changed: Deployment {name} is replaced")
            return self.teacher_waiting("replacing the teacher for the changed spec")
        if teacher is None:
            if ts.get("failures", 0) > 0 and ts.get("lastFailedAttempt") == ts.get("attempts"):
                if ts["failures"] > retries:
                    return self.teacher_failed(ts)
                wait = self.retry_wait(ts)
                if wait > 0:
                    self.requeue(wait)
                    return self.teacher_waiting(f"teacher: retrying in {wait:.0f}s after failure {ts['failures']}")
            self.create(children.teacher_deployment(self.obj, self.run))
            ts.update(phase="Waiting", attempts=ts.get("attempts", 0) + 1, job=name)
            for key in ("queue", "admittedTime"):  # they describe the previous Deployment
                ts.pop(key, None)
            ts.setdefault("startTime", self.ts())
            self.event("Normal", "TeacherStarting", f"Created Deployment {name}")
            return self.teacher_waiting()
        if teacher.available:
            if ts.get("phase") != "Running":
                self.event("Normal", "TeacherReady", f"Teacher server {name} is available")
            ts["phase"] = "Running"
            self.cond(conditions.TEACHER_READY, True, "Available", f"Deployment {name} is available.")
            self.teacher_admission(ts, queued=False)
            return "ready"
        limit = self.run.spec.teacher.serving.ready_timeout_seconds
        stuck = self.observed.waiting.get("teacher") or teacher.replica_failure
        queued = stuck is not None and stuck.reason == "Queued"
        if self.teacher_admission(ts, queued=queued) in ("Queued", "Evicted"):
            return self.teacher_waiting(f"teacher: {stuck.message if stuck else 'queued'}")  # no clock runs
        # The ready clock runs from creation (or the last loss of availability), but not while Kueue held the
        # pods; with a queue, the Deployment's own ProgressDeadlineExceeded may come from queueing: not used.
        waited = self.seconds_since(
            max(t for t in (teacher.unavailable_since, ts.get("admittedTime"), "") if t is not None)
        )
        deadline_exceeded = teacher.deadline_exceeded and not children.teacher_queue(self.run)
        if deadline_exceeded or waited >= limit:
            why = (
                f"Deployment {name} not Available for {waited:.0f}s (spec.teacher.serving.readyTimeoutSeconds "
                f"{limit}{'; ProgressDeadlineExceeded' if deadline_exceeded else ''})"
                + (f": {stuck.message}" if stuck else "")
            )
            ts.update(
                failures=ts.get("failures", 0) + 1,
                lastFailedAttempt=ts.get("attempts", 0),
                lastFailureTime=self.ts(),
                message=clip(why),
            )
            self.delete("Deployment", name)
            self.event("Warning", "TeacherTimeout", clip(f"teacher attempt {ts.get('attempts', 0)}: {why}"))
            if ts["failures"] > retries:
                return self.teacher_failed(ts)
            return self.teacher_waiting(f"teacher: {why}; retrying")
        self.requeue(limit - waited)
        if stuck is not None:
            self.stalled = ("teacher", stuck)
        return self.teacher_waiting()

    def teacher_admission(self, ts: Manifest, *, queued: bool) -> str | None:
        """With a Kueue queue for the teacher: Queued while Kueue's scheduling gate holds its pods (Evicted when
        that follows an admission: Kueue preempted a pod and its replacement waits), Admitted once its pods
        run ungated (``admittedTime``: the ready clock starts there). None without a queue or pods."""
        queue = children.teacher_queue(self.run)
        if not queue:
            return None
        before = ts.get("queue")
        if queued:
            state = "Evicted" if before in ("Admitted", "Evicted") else "Queued"
        elif self.observed.live_pods.get("teacher"):
            state = "Admitted"
        else:
            return before  # no pods yet (or gone): nothing new to say
        ts["queue"] = state
        name = names.teacher(self.name)
        if state == "Admitted":
            msg = f"teacher: Kueue admitted the pods of Deployment {name} (LocalQueue {queue})"
            if before != "Admitted":
                ts["admittedTime"] = self.ts()
                self.event("Normal", "Admitted", msg)
        elif state == "Queued":
            msg = f"teacher: the pods of Deployment {name} are queued in Kueue LocalQueue {queue}"
            if before != "Queued":
                self.event("Normal", "Queued", msg)
        else:
            msg = f"teacher: Kueue evicted a pod of Deployment {name}; its replacement waits in LocalQueue {queue}"
            if before == "Admitted":
                ts["evictions"] = ts.get("evictions", 0) + 1
                self.event("Warning", "Evicted", msg)
        self.admission = (state, msg)
        return state

    def teacher_waiting(self, message: str | None = None) -> Literal["waiting"]:
        self.stage("teacher")["phase"] = "Waiting"
        text = message or f"Waiting for Deployment {names.teacher(self.name)} to become available (model loading)."
        self.cond(conditions.TEACHER_READY, False, "Starting", clip(text))
        self.status["message"] = (
            "distill: waiting for the teacher server to become available" if message is None else text
        )
        return "waiting"

    def teacher_failed(self, ts: Manifest) -> Literal["failed"]:
        ts.update(phase="Failed", reason="TeacherTimeout", completionTime=ts.get("completionTime") or self.ts())
        self.cond(
            conditions.TEACHER_READY,
            False,
            "TeacherTimeout",
            clip(f"not Available in time {ts.get('failures', 0)} time(s); last: {ts.get('message') or ''}"),
        )
        self.failed_stage = "teacher"
        return "failed"
