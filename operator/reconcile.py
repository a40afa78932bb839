"""The operator's decisions: ``decide(run, observed children, now) -> actions + status + events`` (pure).

A run walks its stages in order (``children.operator_stages``: the planned stages, a sidecar teacher
left to the distill pods):
workspace plumbing -> ``sft`` Job -> teacher Deployment + Service (until Available) -> ``distill`` Job ->
``eval`` Job -> teacher removed -> Succeeded. Each batch stage runs as Jobs ``<run>-<stage>-<attempt>``
with ``backoffLimit: 0``; a failed attempt (exit 1, or a pod that vanished) is retried after
``backoffSeconds * 2^(failures-1)`` (at most 10 minutes) until ``spec.retries`` is used up; exit 2 (bad
configuration) fails the stage at once, and a later spec edit retries it. Everything is derived from
the run's status and the children that exist, so an operator restarted at any point continues without
duplicating anything.
"""

from __future__ import annotations

import copy
import logging
import typing
from datetime import datetime
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from opd_runtime.contract import BATCH_STAGES, EXIT_BAD_CONFIG, TRAINING_STAGES
from opd_runtime.plan import processes_per_pod
from opd_runtime.spec import DistillationRunSpec, SpecError, parse_run

from . import children, conditions, names
from .conditions import STAGE_CONDITIONS
from .observe import FAILED_CREATE_AFTER_SECONDS, MAX_MESSAGE_STRING, JobView, Observed, Waiting, clip
from .teacher import TeacherSteps
from .walk import Action, Decision, Event, StageOutcome, rfc3339

log = logging.getLogger("opd_operator")
Manifest = dict[str, Any]


def changed_paths(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Field paths whose values differ between two wire-form specs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


class _Walk(TeacherSteps):
    """One reconcile of one run; ``decide`` below is its only entry point."""

    # ---- plumbing: account, role, binding, spec ConfigMap, workspace PVC ---------------------------
    def plumbing(self) -> None:
        wanted = children.plumbing(self.obj, self.run)
        for manifest in wanted:
            if not self.observed.has(manifest["kind"], manifest["metadata"]["name"]):
                self.create(manifest)
        # The policy goes when spec.teacher.serving.networkPolicy is turned off, or once no teacher runs: an
        # edit that takes the teacher out of the plan leaves it serving the distill attempt that runs with the
        # previous spec, and it must stay closed to everyone else until it is gone.
        policy = names.teacher(self.name)
        keep = self.run.spec.teacher.serving.network_policy and self.observed.teacher is not None
        if (
            self.observed.has("NetworkPolicy", policy)
            and not keep
            and not any(o["kind"] == "NetworkPolicy" for o in wanted)
        ):
            self.delete("NetworkPolicy", policy)
        pvc = self.observed.pvc
        if pvc is not None and not self.run.spec.workspace.existing_claim:
            owned = any(
                r.get("uid") == self.obj["metadata"]["uid"] for r in pvc["metadata"].get("ownerReferences") or []
            )
            want = self.run.spec.workspace.retention_policy == "Delete"
            if owned != want:
                refs = [names.owner_reference(self.obj)] if want else None
                self.d.actions.append(
                    Action(
                        "patch",
                        "PersistentVolumeClaim",
                        pvc["metadata"]["name"],
                        {"metadata": {"ownerReferences": refs}},
                    )
                )
        self.status["workspaceClaim"] = self.run.spec.workspace.existing_claim or names.workspace_claim(self.name)

    def spec_freeze(self) -> None:
        """Stages read the run file from the ConfigMap: it changes only while no stage Job runs; an edit
        made while one runs is refused for that stage (SpecAccepted=False names the fields). The teacher
        does not hold the spec: one serving an older run file is replaced (``teacher_ready``) before the
        learner that reads the new file starts, so learner and teacher always read the same spec."""
        want = children.spec_hash(self.run)
        active = [j for j in self.observed.jobs if j.state == "active" and not j.deleting]
        running = next((j.spec_hash for j in active), None)
        cm = self.observed.config_map
        if running is not None and not children.same_spec(running, self.run):
            frozen = yaml.safe_load((cm or {}).get("data", {}).get(names.CONFIG_FILE, "") or "{}") or {}
            paths = changed_paths(frozen.get("spec", {}), children.stage_spec(self.run)) or ["spec"]
            what = active[0].stage
            self.cond(
                conditions.SPEC_ACCEPTED,
                False,
                "ChangedWhileRunning",
                f"{', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''} changed while the {what} stage "
                + (
                    f"waits in its queue (Job {active[0].name} is suspended); it will run with the previous spec"
                    if active[0].suspended
                    else "runs; it keeps running with the previous spec"
                )
                + f" and later stages get the new one. Revert the edit, or suspend and resume the run to restart "
                f"{what} with it.",
            )
            before = conditions.get(self.old.get("conditions") or [], conditions.SPEC_ACCEPTED) or {}
            if before.get("status") != "False":
                self.event("Warning", "SpecChangeRefused", f"{', '.join(paths[:5])} cannot change while {what} runs")
            return
        if cm is not None and (cm["metadata"].get("annotations") or {}).get(names.SPEC_HASH_ANNOTATION) != want:
            desired = children.config_map(self.obj, self.run)
            self.d.actions.append(
                Action(
                    "patch",
                    "ConfigMap",
                    desired["metadata"]["name"],
                    {"metadata": {"annotations": desired["metadata"]["annotations"]}, "data": desired["data"]},
                )
            )
        self.cond(conditions.SPEC_ACCEPTED, True, "Applied", "Stages run with the current spec.")

    # ---- suspend ---------------------------------------------------------------------------------
    def suspend(self) -> None:
        deleted = []
        for job in self.observed.jobs:
            if job.state == "active" and not job.deleting:
                self.delete("Job", job.name)
                deleted.append(job.name)
        self.stop_teacher(reason="Suspended")
        for name in BATCH_STAGES:
            ss = self.stages.get(name)
            if ss and ss.get("phase") in ("Running", "Waiting", "Retrying"):
                ss["phase"] = "Pending"
                ss.pop("ranks", None)
                ss.pop("queue", None)  # its Job (and Kueue's Workload with it) is deleted
        self.status.update(
            phase="Suspended",
            message="Suspended: stage pods deleted, workspace kept; set "
            "spec.suspend=false to resume from the last checkpoint.",
        )
        self.cond(conditions.SUSPENDED, True, "Suspended", "spec.suspend is true.")
        self.cond(conditions.READY, False, "Suspended", "The run is suspended.")
        if self.old.get("phase") != "Suspended":
            self.event(
                "Normal",
                "Suspended",
                "Suspended" + (f"; deleted {', '.join(deleted)}" if deleted else "") + "; the workspace is kept",
            )

    # ---- batch stages ------------------------------------------------------------------------------
    def record_success(self, stage: str, ss: Manifest, job: JobView) -> None:
        result = job.termination.result if job.termination else {}
        ss.update(
            phase="Succeeded",
            completionTime=(job.termination and job.termination.finished_at) or self.ts(),
            exitCode=0,
            job=job.name,
        )
        for key, field_name in (
            ("checkpoint", "checkpoint"),
            ("step", "step"),
            ("reverse_kl", "reverseKL"),
            ("eval_score", "evalScore"),
        ):
            if result.get(key) is not None:
                ss[field_name] = result[key]
        ss.pop("message", None)
        self.flag_dropped(stage, job)
        seconds = self.seconds_since(ss.get("startTime"))
        self.d.outcomes.append(StageOutcome(stage, "succeeded", seconds))
        self.event(
            "Normal",
            "StageSucceeded",
            f"{stage} succeeded ({job.name})"
            + (f": checkpoint {ss['checkpoint']}" if ss.get("checkpoint") else "")
            + (f", eval score {ss['evalScore']}" if ss.get("evalScore") is not None else ""),
        )

    def flag_dropped(self, stage: str, job: JobView) -> None:
        """A termination message with fields of the wrong type: they were left out of the status (which
        they would have made unpatchable); say which, once, with the attempt's result."""
        if job.termination is not None and job.termination.dropped:
            self.event(
                "Warning",
                "BadTerminationMessage",
                f"{stage} ({job.name}): termination message fields left out of the status: "
                + "; ".join(job.termination.dropped)[:900],
            )

    def record_failure(self, stage: str, ss: Manifest, job: JobView) -> None:
        term = job.termination
        code = term.exit_code if term else None
        error = (term.error if term else "") or ("the pod was lost before it finished" if term is None else "")
        if job.failure_reason == "DeadlineExceeded":
            limit = getattr(self.run.spec, stage).timeout_seconds
            was = conditions.get(self.conds, conditions.STALLED) or {}
            error = (
                f"the attempt ran past spec.{stage}.timeoutSeconds ({limit}s) and was stopped"
                + (f" (it was stalled: {was.get('message')})" if was.get("status") == "True" else "")
                + (f"; {error}" if term is not None and error else "")
            )
        ss.update(
            failures=ss.get("failures", 0) + 1,
            lastFailedAttempt=job.attempt,
            exitCode=code,
            lastFailureTime=(term and term.finished_at) or self.ts(),
            message=error[-MAX_MESSAGE_STRING:] or None,
            job=job.name,
        )
        if code == EXIT_BAD_CONFIG:
            ss["failedGeneration"] = self.generation
        self.flag_dropped(stage, job)
        self.event(
            "Warning",
            "StageFailed",
            clip(
                f"{stage} attempt {job.attempt} ({job.name}) failed"
                f"{f' with exit code {code}' if code is not None else ''}: {error or 'no message'}"
            ),
        )

    def record_vanished(self, stage: str, ss: Manifest, latest: JobView | None) -> None:
        """The attempt's Job is gone, or going, before it finished, and not by the operator's hand (its own
        deletions, on suspend or an invalid spec, set the stage Pending first): a failure of the attempt,
        so the back-off and ``spec.retries`` bound how often it is started again."""
        attempt = ss.get("attempts", 0)
        if (
            attempt == 0
            or ss.get("lastFailedAttempt") == attempt
            or ss.get("job") != names.job(self.name, stage, attempt)
        ):
            return
        if not (ss.get("phase") == "Running" or (ss.get("phase") == "Waiting" and ss.get("queue"))):
            return
        if latest is not None and not (latest.deleting and latest.state == "active"):
            return
        job = ss["job"]
        message = (
            f"Job {job} was deleted before it finished (not by the operator); attempt {attempt} counts as a "
            "failure: delete the run, or set spec.suspend, to stop it"
        )
        ss.update(
            failures=ss.get("failures", 0) + 1,
            lastFailedAttempt=attempt,
            exitCode=None,
            lastFailureTime=self.ts(),
            message=message,
        )
        self.event("Warning", "JobDeleted", f"{stage}: {message}")

    def start_timed_out(self, stage: str, ss: Manifest, job: JobView, stuck: Waiting | None) -> bool:
        """No pod of the attempt has run for ``spec.startTimeoutSeconds`` since its Job started: the Job is
        deleted and the attempt counts as a failure naming what it waited for (True). Otherwise a reconcile
        is scheduled for the deadline, and for the moment a pod-less Job's Events are worth reading."""
        limit = self.run.spec.start_timeout_seconds
        if stage == "distill" and children.teacher_sidecar(self.run):
            # the pod stays initializing while its sidecar teacher loads the model: that has its own budget
            limit += self.run.spec.teacher.serving.ready_timeout_seconds
        waited = self.seconds_since(job.start_time)
        if waited < limit:
            self.requeue(limit - waited)
            if not job.has_pods and waited < FAILED_CREATE_AFTER_SECONDS:
                self.requeue(FAILED_CREATE_AFTER_SECONDS - waited)
            return False
        why = f"no pod of Job {job.name} ran within spec.startTimeoutSeconds ({limit}s)" + (
            f": {stuck.message}" if stuck else ""
        )
        ss.update(
            failures=ss.get("failures", 0) + 1,
            lastFailedAttempt=job.attempt,
            exitCode=None,
            lastFailureTime=self.ts(),
            message=clip(why),
        )
        self.delete("Job", job.name)
        self.event("Warning", "StageStartTimeout", clip(f"{stage} attempt {job.attempt}: {why}"))
        return True

    # ---- Kueue and disruptions ---------------------------------------------------------------------
    def job_admission(self, stage: str, ss: Manifest, job: JobView) -> str:
        """Kueue's verdict on the stage's Job (``spec.queueName``, or a Job some admission controller
        suspended without one, e.g. Kueue with manageJobsWithoutQueueName): Admitted (unsuspended), Queued
        (suspended, never admitted) or Evicted (suspended again after the operator saw it admitted: preempted,
        or its quota reclaimed). The operator never writes ``spec.suspend`` of such a Job; Kueue owns it. The
        Job controller clears a suspended Job's startTime, so only ``stages.<stage>.queue`` remembers that it
        ran. An eviction deletes the pods without failing the Job: it is no failure and uses no retry."""
        before = ss.get("queue")
        if not job.suspended:
            state = "Admitted"
        elif before in ("Admitted", "Evicted"):
            state = "Evicted"
        else:
            state = "Queued"
        ss["queue"] = state
        kueue = f"Kueue LocalQueue {job.queue}" if job.queue else ""
        other = (
            "spec.queueName is empty: another controller suspended it, e.g. Kueue managing Jobs without a queue name"
        )
        if state == "Admitted":
            msg = f"{stage}: Job {job.name} admitted" + (f" by {kueue}" if kueue else f" ({other})")
            if before != "Admitted":
                self.event("Normal", "Admitted", msg)
        elif state == "Queued":
            ss["phase"] = "Waiting"
            msg = f"{stage}: Job {job.name} is " + (
                f"queued in {kueue}, waiting for admission" if kueue else f"suspended, waiting to be admitted ({other})"
            )
            if before != "Queued":
                self.event("Normal", "Queued", msg)
            self.status["message"] = msg
        else:
            ss["phase"] = "Waiting"
            if before == "Admitted":
                ss["evictions"] = ss.get("evictions", 0) + 1
            msg = (
                f"{stage}: Job {job.name} was evicted" + (" by Kueue" if kueue else "") + " (preempted, or its quota "
                f"reclaimed) and waits to be admitted again{f' in {kueue}' if kueue else ''}; it then resumes from "
                f"its last checkpoint (eviction {ss.get('evictions', 1)}; not a failure, spec.retries is not used)"
            )
            if before == "Admitted":
                self.event("Warning", "Evicted", msg)
            self.status["message"] = msg
        self.admission = (state, msg)
        return state

    def record_disruptions(self, stage: str, ss: Manifest, job: JobView) -> None:
        """Pods of the attempt that the cluster disrupted (preemption, drain, eviction): the Job's
        podFailurePolicy replaced them (``children.pod_failure_policy``), so they are no failure; one Warning
        event each, and ``disruptions`` counts them over all attempts."""
        seen = set(ss.get("disruptedPods") or [])
        new = [p for p in job.disrupted if p not in seen]
        if not new:
            return
        ss["disruptedPods"] = sorted(seen | set(new))
        ss["disruptions"] = ss.get("disruptions", 0) + len(new)
        for pod in new:
            self.event(
                "Warning",
                "PodDisrupted",
                f"{stage} attempt {job.attempt} ({job.name}): pod {pod} was disrupted by the cluster; the Job "
                "replaces it and the stage resumes from its last checkpoint (not a failure, spec.retries is not used)",
            )

    def record_ranks(self, stage: str, ss: Manifest, job: JobView) -> None:
        """A multi-node attempt's pods in the stage status (``ranks``) and the run's message."""
        if job.pods <= 1:
            ss.pop("ranks", None)
            return
        gpus = getattr(self.run.spec, stage).resources.gpus
        ss["ranks"] = {
            "pods": job.pods,
            "processes": job.pods * processes_per_pod(gpus),
            "running": job.running,
            "ready": job.ready,
        }

    def drop_ranks_service(self, stage: str) -> None:
        """A finished stage needs no rendezvous names any more."""
        if self.observed.has("Service", names.ranks_service(self.name, stage)):
            self.delete("Service", names.ranks_service(self.name, stage))

    def final_failure(self, ss: Manifest) -> str | None:
        """Why the stage's failure is final (no retry now), or None."""
        if ss.get("failures", 0) == 0 or ss.get("lastFailedAttempt") != ss.get("attempts"):
            return None
        if ss.get("exitCode") == EXIT_BAD_CONFIG and ss.get("failedGeneration") == self.generation:
            return "BadConfiguration"
        if ss["failures"] > self.run.spec.retries:
            return "RetriesExhausted"
        return None

    def walk_stage(self, stage: str) -> Literal["done", "busy", "failed"]:
        ss = self.stage(stage)
        if ss.get("phase") == "Succeeded":
            self.drop_ranks_service(stage)  # again while it is seen: one missed delete must not leave it
            return "done"
        jobs = sorted((j for j in self.observed.jobs if j.stage == stage), key=lambda j: j.attempt)
        ss["attempts"] = max([ss.get("attempts", 0)] + [j.attempt for j in jobs])
        latest = next((j for j in jobs if j.attempt == ss["attempts"]), None)
        if latest is not None:
            self.record_disruptions(stage, ss, latest)
        if latest is not None and latest.state == "active" and not latest.deleting:
            ss.update(phase="Running", job=latest.name)
            # suspended by Kueue (never by the operator), or was: `queue` describes the latest attempt's Job
            queued = latest.queue is not None or latest.suspended or "queue" in ss
            if queued and self.job_admission(stage, ss, latest) != "Admitted":
                ss.pop("ranks", None)
                return "busy"
            self.record_ranks(stage, ss, latest)
            stuck = self.observed.waiting.get(stage)
            if stuck is not None:
                self.stalled = (stage, stuck)
            if not latest.started and not latest.suspended and self.start_timed_out(stage, ss, latest, stuck):
                self.keep_stall = True
                return "busy"
            # Pods on their way out (a deadline's, seen before the Job's FailureTarget reaches a watch-fed view)
            # say nothing new: Stalled keeps what it said, so the failure can name what the attempt waited for.
            staying = [p for p in self.observed.live_pods.get(stage, ()) if p not in self.observed.going]
            self.keep_stall = latest.failure_reason is not None or not staying
            return "busy"
        ss.pop("ranks", None)  # no attempt runs
        self.record_vanished(stage, ss, latest)
        if latest is not None and latest.state == "succeeded":
            self.record_success(stage, ss, latest)
            self.drop_ranks_service(stage)
            return "done"
        if (
            latest is not None
            and latest.state == "failed"
            and ss.get("lastFailedAttempt") != latest.attempt
            and not latest.disrupted_failure  # a gang the cluster broke: a new one starts at once, no retry used
        ):
            self.record_failure(stage, ss, latest)
        why = self.final_failure(ss)
        if why is not None:
            if self.old_stage_phase(stage) != "Failed":
                self.d.outcomes.append(StageOutcome(stage, "failed", self.seconds_since(ss.get("startTime"))))
            ss.update(phase="Failed", completionTime=ss.get("completionTime") or self.ts(), reason=why)
            self.drop_ranks_service(stage)
            return "failed"
        ss.pop("reason", None)
        ss.pop("completionTime", None)
        # A new attempt is due: first wait for every other stage pod to be gone (never two writers of the
        # workspace), e.g. a previous attempt, or a stage an edit took out of the plan while it ran.
        busy = next(
            (pods[0] for s, pods in sorted(self.observed.live_pods.items()) if s in BATCH_STAGES and pods), None
        )
        busy = busy or next((j.name for j in self.observed.jobs if j.state == "active" and not j.deleting), None)
        if busy is not None:
            ss["phase"] = "Waiting"
            self.status["message"] = f"{stage}: waiting for {busy} to stop"
            return "busy"
        if stage == "distill" and "teacher" in self.planned:
            teacher = self.teacher_ready()
            if teacher == "failed":
                ss["phase"] = "Pending"
                return "failed"
            if teacher == "waiting":
                ss["phase"] = "Waiting"
                return "busy"
        if ss.get("lastFailedAttempt") == ss["attempts"] and ss.get("failures", 0) > 0:
            wait = self.retry_wait(ss)
            if wait > 0:
                ss["phase"] = "Retrying"
                self.d.requeue_after = wait
                self.status["message"] = f"{stage}: retrying in {wait:.0f}s after failure {ss['failures']}"
                return "busy"
        attempt = ss["attempts"] + 1
        job = children.stage_job(self.obj, self.run, stage, attempt)
        service = names.ranks_service(self.name, stage)
        if children.nodes(self.run, stage) > 1 and not self.observed.has("Service", service):
            self.create(children.ranks_service(self.obj, stage))  # before the pods: their DNS names
        self.create(job)
        ss.update(phase="Running", attempts=attempt, job=job["metadata"]["name"])
        for key in ("queue", "disruptedPods"):  # they describe the previous attempt's Job
            ss.pop(key, None)
        ss.setdefault("startTime", self.ts())
        self.status.setdefault("startTime", self.ts())
        self.event("Normal", "StageStarted", f"Started {stage} attempt {attempt}: Job {job['metadata']['name']}")
        return "busy"

    # ---- the whole run -----------------------------------------------------------------------------
    def stage_conditions(self) -> None:
        if "teacher" in self.planned and conditions.get(self.conds, conditions.TEACHER_READY) is None:
            self.cond(conditions.TEACHER_READY, None, "NotStarted", "The teacher server starts before distill.")
        for stage in BATCH_STAGES:
            if stage not in self.planned:
                continue
            ss = self.stage(stage)
            phase = ss.get("phase", "Pending")
            type_ = STAGE_CONDITIONS[stage]
            if phase == "Succeeded":
                self.cond(type_, True, "Succeeded", f"Job {ss.get('job')} finished.")
            elif phase == "Failed":
                self.cond(
                    type_,
                    False,
                    ss.get("reason", "Failed"),
                    f"{stage} failed {ss.get('failures', 0)} time(s); last: {ss.get('message') or 'no message'}",
                )
            elif phase == "Waiting" and ss.get("queue") in ("Queued", "Evicted"):
                self.cond(type_, None, ss["queue"], f"Job {ss.get('job')} waits for admission by Kueue.")
            elif phase in ("Running", "Waiting", "Retrying"):
                self.cond(
                    type_,
                    None,
                    phase,
                    f"Job {ss.get('job')}" if phase == "Running" and ss.get("job") else f"{stage} is {phase.lower()}.",
                )
            else:
                self.cond(type_, None, "NotStarted", f"{stage} has not started.")

    def numbers(self, current: str | None) -> None:
        """step / totalSteps / reverseKL / evalScore: finished stages' results, then live progress."""
        for stage in TRAINING_STAGES:
            ss = self.stages.get(stage) or {}
            if ss.get("phase") == "Succeeded" and ss.get("step") is not None:
                self.status["step"] = ss["step"]
                self.status["totalSteps"] = getattr(self.run.spec, stage).steps
                if ss.get("reverseKL") is not None:
                    self.status["reverseKL"] = ss["reverseKL"]
        progress = self.old.get("progress") or {}
        if current is not None and progress.get("stage") in TRAINING_STAGES and progress.get("stage") == current:
            if progress.get("step") is not None:
                self.status["step"] = progress["step"]
                self.status["totalSteps"] = progress.get("totalSteps")
                self.stage(current)["step"] = progress["step"]
            if progress.get("reverseKL") is not None:
                self.status["reverseKL"] = progress["reverseKL"]
                self.stage(current)["reverseKL"] = progress["reverseKL"]
        ev = self.stages.get("eval") or {}
        if ev.get("evalScore") is not None:
            self.status["evalScore"] = ev["evalScore"]

    def decide(self) -> Decision:
        self.plumbing()
        self.spec_freeze()
        finished = all(
            (self.stages.get(s) or {}).get("phase") == "Succeeded" for s in self.planned if s in BATCH_STAGES
        )
        if self.run.spec.suspend and not finished:
            self.suspend()
            return self.finish(current=None)
        self.cond(conditions.SUSPENDED, False, "NotSuspended", "")
        if self.old.get("phase") == "Suspended":
            self.event("Normal", "Resumed", "Resumed; stages continue from their last checkpoint")
        current: str | None = None
        outcome = "done"
        for stage in (s for s in self.planned if s in BATCH_STAGES):
            outcome = self.walk_stage(stage)
            if outcome != "done":
                current = self.failed_stage or stage
                break
        distill_over = (self.stages.get("distill") or {}).get("phase") in ("Succeeded", "Failed")
        teacher_up = self.observed.teacher is not None or self.observed.has("Service", names.teacher(self.name))
        if "teacher" in self.planned and teacher_up and (distill_over or outcome == "failed" or current == "sft"):
            self.stop_teacher(reason="Finished" if distill_over and outcome != "failed" else "Stopped")
        elif "teacher" not in self.planned and teacher_up:
            self.drop_unplanned_teacher()
        self.status["stage"] = current or ""
        if outcome == "failed" and current is not None:
            ss = self.stages[current]
            msg = (
                f"{current} failed ({ss.get('reason')}) after {ss.get('attempts')} attempt(s): "
                f"{ss.get('message') or 'no message'}"
            )
            self.status.update(phase="Failed", message=clip(msg))
            self.status.setdefault("completionTime", self.ts())
            self.cond(conditions.FAILED, True, f"{current.capitalize()}Failed", clip(msg))
            self.cond(conditions.READY, False, "Failed", clip(msg))
            if self.old.get("phase") != "Failed":
                self.event("Warning", "RunFailed", clip(msg))
        elif current is None:
            self.status.update(phase="Succeeded", message="All stages succeeded.")
            self.status.setdefault("completionTime", self.ts())
            self.cond(conditions.FAILED, False, "Succeeded", "")
            self.cond(conditions.READY, True, "Succeeded", "All stages succeeded.")
            if self.old.get("phase") != "Succeeded":
                self.event("Normal", "RunSucceeded", "All stages succeeded")
        else:
            started = any((self.stages.get(s) or {}).get("attempts") for s in self.planned)
            self.status["phase"] = "Running" if started else "Pending"
            self.status.pop("completionTime", None)
            ss = self.stages[current]
            if ss.get("phase") == "Running":
                ranks = ss.get("ranks")
                pods = f" ({ranks['ready']}/{ranks['pods']} pods ready)" if ranks else ""
                self.status["message"] = f"{current}: running Job {ss.get('job')}{pods}"
            self.cond(conditions.FAILED, False, "NoFailure", "")
            self.cond(conditions.READY, False, "InProgress", f"Stage {current} is {ss.get('phase', '').lower()}.")
        return self.finish(current)

    def stall(self) -> None:
        """Stalled: True (with the reason, in the message and one Event) while the current stage's pods
        cannot start; False once they can. Absent until it is first True."""
        before = conditions.get(self.old.get("conditions") or [], conditions.STALLED) or {}
        if self.stalled is None:
            if before and not self.keep_stall:
                self.cond(conditions.STALLED, False, "NotStalled", "")
            return
        stage, why = self.stalled
        text = clip(f"{stage}: {why.message}")
        self.status["message"] = text
        self.cond(conditions.STALLED, True, why.reason, text)
        same = before.get("status") == "True" and before.get("reason") == why.reason
        if not (same and why.pod in (before.get("message") or "")):
            self.event("Warning", why.reason, text)

    def finish(self, current: str | None) -> Decision:
        self.stall()  # stalled only while a stage is in progress: suspended or finished runs clear it
        if self.admission is not None:
            state, msg = self.admission
            self.cond(conditions.ADMITTED, state == "Admitted", state, clip(msg))
        self.stage_conditions()
        self.numbers(current)
        self.status["conditions"] = self.conds
        self.status["observedGeneration"] = self.generation
        self.d.status = self.status
        return self.d


def invalid(obj: Manifest, err: SpecError, now: datetime, observed: Observed | None = None) -> Decision:
    """A run whose spec the models reject (the CRD schema let it through): Failed, with the reasons. A run
    edited into an invalid spec stops what runs (stage Jobs, the teacher), as a suspend does: Failed holds no
    GPUs, and a fixed spec resumes the stopped stage from its last checkpoint, without counting a failure."""
    old = obj.get("status") or {}
    status = {k: v for k, v in copy.deepcopy(old).items() if k != "progress"}
    actions: list[Action] = []
    run_name = obj["metadata"]["name"]
    if observed is not None:
        actions += [Action("delete", "Job", j.name) for j in observed.jobs if j.state == "active" and not j.deleting]
        if observed.teacher is not None and not observed.teacher.deleting:
            actions.append(Action("delete", "Deployment", names.teacher(run_name)))
        if observed.has("Service", names.teacher(run_name)):
            actions.append(Action("delete", "Service", names.teacher(run_name)))
    for ss in (status.get("stages") or {}).values():
        if ss.get("phase") in ("Running", "Waiting", "Retrying"):
            ss["phase"] = "Pending"
            for key in ("ranks", "queue"):
                ss.pop(key, None)
    gen = obj["metadata"].get("generation")
    text = str(err).split(":\n", 1)[-1].replace("\n", "; ")
    conds = conditions.set_condition(
        status.get("conditions") or [], conditions.FAILED, True, "InvalidSpec", text, now=rfc3339(now), generation=gen
    )
    conds = conditions.set_condition(
        conds, conditions.READY, False, "InvalidSpec", text, now=rfc3339(now), generation=gen
    )
    status.update(phase="Failed", message=clip(f"invalid spec: {text}"), conditions=conds, observedGeneration=gen)
    status.setdefault("completionTime", rfc3339(now))  # a finished run's TTL counts from here (ttl.py)
    if actions:
        text += "; its Jobs and teacher are stopped: fix the spec to resume from the last checkpoint"
    events = [] if old.get("phase") == "Failed" else [Event("Warning", "InvalidSpec", clip(text))]
    return Decision(actions=actions, status=status, events=events)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The spec model a field holds (directly, in a list, or optional), else None (free-form values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_of(arg)
        if model is not None:
            return model
    return None


def unknown_fields(value: Any, model: type[BaseModel], prefix: str) -> list[str]:
    """Drop, in place, the keys of ``value`` that ``model`` does not know (fields a newer CRD added), and
    return their paths. The operator tolerates them, where `opd validate` refuses them (typos)."""
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in unknown_fields(item, model, f"{prefix}[{i}]")]
    if not isinstance(value, dict):
        return []
    # every key validation accepts: the alias (set, or made by the alias generator: pydantic leaves
    # FieldInfo.alias unset for some generated ones) and, with populate_by_name, the field's own name
    generate = model.model_config.get("alias_generator")
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        keys = {name, info.alias or (generate(name) if callable(generate) else name)}
        fields.update(dict.fromkeys(keys, info))
    found: list[str] = []
    for key in list(value):
        if key not in fields:
            del value[key]
            found.append(f"{prefix}.{key}")
            continue
        sub = _model_of(fields[key].annotation)
        if sub is not None:
            found += unknown_fields(value[key], sub, f"{prefix}.{key}")
    return found


def decide(obj: Manifest, observed: Observed, now: datetime) -> Decision:
    """What should exist for run ``obj`` given its ``observed`` children, and its new status."""
    source = f"DistillationRun {obj['metadata']['name']}"
    spec = copy.deepcopy(obj.get("spec"))
    ignored = unknown_fields(spec, DistillationRunSpec, "spec") if isinstance(spec, dict) else []
    if ignored:
        # a CRD newer than this operator: its new fields have no effect here, and fail nothing
        log.warning("%s: fields this operator does not know are ignored: %s", source, ", ".join(ignored))
        obj = {**obj, "spec": spec}
    try:
        run = parse_run(obj, source=source)
    except SpecError as err:
        return invalid(obj, err, now, observed)
    problems = children.cluster_problems(run)
    if problems:
        return invalid(obj, SpecError(f"{source}: cannot run on Kubernetes:\n" + "\n".join(problems)), now, observed)
    return _Walk(obj, run, observed, now).decide()
