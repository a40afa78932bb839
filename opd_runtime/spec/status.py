"""The status of a DistillationRun as the operator (and, for ``progress``, the stage process) writes it.

These models document the status subresource: the CRD's status schema is generated from them, so
``kubectl explain distillationrun.status`` reads these descriptions. The operator writes every field
except ``progress``, which the running stage merge-patches through its narrowly permitted
ServiceAccount (see ``opd_runtime.stage_report``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from .base import SpecModel

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
StagePhase = Literal["Pending", "Waiting", "Running", "Retrying", "Succeeded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]


class StatusModel(SpecModel):
    # Status is written by programs, not people: tolerate fields a newer writer adds.
    model_config = ConfigDict(**{**SpecModel.model_config, "extra": "ignore"})


class Condition(StatusModel):
    type: str = Field(
        description="PascalCase condition type, e.g. `Ready`, `Failed`, `SftSucceeded`, "
        "`TeacherReady`, `DistillSucceeded`, `EvalSucceeded`, `Suspended`, `SpecAccepted`, `Stalled` (True while "
        "the current stage's pods cannot start; the reason says why: Unschedulable, ClaimPending, ImagePullError, "
        "ContainerConfigError, CrashLoopBackOff, FailedCreate), `Admitted` (with spec.queueName: True once Kueue "
        "admitted the current stage's Job or teacher pods, False with reason Queued or Evicted while they wait)."
    )
    status: ConditionStatus = Field(description="`True`, `False` or `Unknown`.")
    reason: str = Field(description="PascalCase, machine-readable reason for the condition's last transition.")
    message: str = Field("", description="Human-readable details: what happened and what to do about it.")
    last_transition_time: str = Field(description="When `status` last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, description="`metadata.generation` of the spec this condition was computed from."
    )


class RanksStatus(StatusModel):
    pods: int = Field(description="Pods of the latest attempt: the stage's resources.nodes.")
    processes: int = Field(description="Training processes over all pods (torchrun's world size).")
    running: int = Field(0, description="Pods of the latest attempt that have not finished.")
    ready: int = Field(0, description="Pods of the latest attempt that are running and Ready.")


class StageStatus(StatusModel):
    phase: StagePhase = Field(
        "Pending",
        description="`Pending` (not started), `Waiting` (for the teacher, a "
        "retry back-off or Kueue's admission: see `queue`), `Running`, `Retrying`, `Succeeded` or `Failed`.",
    )
    attempts: int = Field(
        0, description="Pods (Jobs) started for this stage so far, counting ones deleted by a suspend."
    )
    failures: int = Field(0, description="Attempts that failed; the run fails when this exceeds spec.retries.")
    job: str | None = Field(None, description="Name of the Job of the latest attempt.")
    start_time: str | None = Field(None, description="When the first attempt started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the stage succeeded or finally failed.")
    last_failure_time: str | None = Field(None, description="When the latest failed attempt ended.")
    last_failed_attempt: int | None = Field(None, description="Attempt number of the latest failure.")
    exit_code: int | None = Field(
        None, description="Exit code of the latest finished attempt (0 done, 1 transient failure, 2 bad configuration)."
    )
    message: str | None = Field(None, description="The latest attempt's termination message or error.")
    failed_generation: int | None = Field(
        None, description="Spec generation at a bad-configuration failure (exit 2); a spec edit retries."
    )
    checkpoint: str | None = Field(None, description="Path (in the workspace) of the stage's final model.")
    step: int | None = Field(None, description="Last step the stage reported.")
    reverse_kl: float | None = Field(
        None, alias="reverseKL", description="distill: per-token reverse KL of the last step."
    )
    eval_score: float | None = Field(None, description="eval: headline pass@1 (see status.evalScore).")
    ranks: RanksStatus | None = Field(
        None, description="sft, distill on several pods (resources.nodes > 1): the latest attempt's pods."
    )
    queue: Literal["Queued", "Admitted", "Evicted"] | None = Field(
        None,
        description="With spec.queueName: Kueue's verdict on the latest attempt's Job (or the teacher's pods): "
        "`Queued` (suspended, waiting for admission), `Admitted` (running), `Evicted` (suspended again after "
        "it ran: preempted or its quota reclaimed; it resumes from its last checkpoint when admitted again).",
    )
    evictions: int = Field(0, description="Times Kueue evicted this stage after admitting it (no failures).")
    admitted_time: str | None = Field(
        None, description="teacher with a Kueue queue: when its pods were admitted; its ready clock starts there."
    )
    disruptions: int = Field(
        0,
        description="Pods the cluster disrupted (preemption, node drain, eviction: condition DisruptionTarget); "
        "the Job replaced each within its attempt, so they used no retry.",
    )
    disrupted_pods: list[str] = Field(
        default_factory=list, description="The latest attempt's disrupted pods, as `pod (reason)`."
    )


class StagesStatus(StatusModel):
    sft: StageStatus | None = Field(None, description="Stage 1: SFT Job.")
    teacher: StageStatus | None = Field(None, description="The teacher vLLM Deployment (runs beside distill).")
    distill: StageStatus | None = Field(None, description="Stage 2: the OPD learner Job.")
    eval: StageStatus | None = Field(None, description="Stage 3: the evaluation Job.")


class Progress(StatusModel):
    stage: str = Field(description="Stage reporting (`sft`, `distill`, `eval`).")
    step: int | None = Field(None, description="Last finished step.")
    total_steps: int | None = Field(None, description="Steps the stage will run.")
    reverse_kl: float | None = Field(
        None, alias="reverseKL", description="distill: per-token reverse KL of the last step."
    )
    updated_at: str | None = Field(None, description="When the stage sent this report (RFC 3339).")


class DistillationRunStatus(StatusModel):
    phase: Phase | None = Field(None, description="`Pending`, `Running`, `Suspended`, `Succeeded` or `Failed`.")
    stage: str | None = Field(
        None,
        description="The stage running or waiting now (`sft`, `teacher`, "
        "`distill`, `eval`); empty once the run has finished.",
    )
    message: str | None = Field(None, description="One line on what the run is doing or why it failed.")
    observed_generation: int | None = Field(
        None, description="`metadata.generation` of the spec the operator last reconciled."
    )
    step: int | None = Field(None, description="Latest step of the current (or last) training stage.")
    total_steps: int | None = Field(None, description="Steps of that stage.")
    reverse_kl: float | None = Field(
        None, alias="reverseKL", description="Latest per-token reverse KL reported by the OPD learner."
    )
    eval_score: float | None = Field(
        None,
        description="Headline evaluation result: pass@1 of the last trained model (`distill`, else "
        "`sft`, else the first target) on the first eval dataset.",
    )
    workspace_claim: str | None = Field(None, description="The PVC holding the workspace.")
    start_time: str | None = Field(None, description="When the first stage started.")
    completion_time: str | None = Field(None, description="When the run succeeded or failed.")
    children_deleted_time: str | None = Field(
        None,
        description="When spec.ttlSecondsAfterFinished (or the operator's default) deleted the finished run's "
        "children; unset while they exist.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Current state as conditions: `Ready`, `Failed`, `Suspended`, `SpecAccepted`, `Stalled` "
        "(present once pods could not start), `Admitted` (with a Kueue queue) and one per stage.",
    )
    stages: StagesStatus = Field(
        default_factory=lambda: StagesStatus.model_validate({}),
        description="Per-stage attempts, times, results and checkpoints.",
    )
    progress: Progress | None = Field(
        None,
        description="Written by the running stage itself (ServiceAccount `<run>-stage` may only "
        "get/patch this run's status): its latest step and reverse KL, a few times a minute.",
    )
