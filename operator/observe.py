"""What a run's children say about it: plain-dict API objects folded into small typed views (pure)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from opd_runtime.contract import EXIT_BAD_CONFIG

from . import names

Manifest = dict[str, Any]
JobState = Literal["active", "succeeded", "failed"]
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # pod annotation set by the Job controller
# A stage Job without pods this long after it started: its Events are read for a FailedCreate (podless_jobs).
FAILED_CREATE_AFTER_SECONDS = 10.0
# The kinds the operator lists per run (by label selector), and their API paths.
KINDS = (
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Job",
    "Pod",
    "Deployment",
    "Service",
    "NetworkPolicy",
)


def parse_time(text: str | None) -> datetime | None:
    """An API timestamp (RFC 3339, whole seconds, UTC) as a datetime; None for none."""
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Termination:
    """How a stage container ended: its exit code and its termination message (see stage_report)."""

    exit_code: int | None
    reason: str | None = None
    finished_at: str | None = None
    result: dict[str, Any] = field(default_factory=dict)  # the JSON message, or {"error": text}; checked
    dropped: tuple[str, ...] = ()  # "<field>: <why>" for message fields left out of `result`

    @property
    def error(self) -> str:
        msg = self.result.get("error") or ""
        return str(msg).strip() or (self.reason or "")


@dataclass(frozen=True)
class JobView:
    name: str
    stage: str
    attempt: int
    state: JobState
    deleting: bool
    spec_hash: str | None
    termination: Termination | None
    pods: int = 1  # spec.completions: the pods (nodes) of the attempt
    running: int = 0  # status.active: pods not yet finished
    ready: int = 0  # status.ready: pods running and Ready
    failure_reason: str | None = None  # the Failed condition's reason, e.g. DeadlineExceeded
    queue: str | None = None  # its Kueue LocalQueue (label kueue.x-k8s.io/queue-name), None outside Kueue
    suspended: bool = False  # spec.suspend: Kueue has not admitted it (yet, or again after an eviction)
    # pods the cluster disrupted (condition DisruptionTarget: preemption, drain, eviction), as "pod (reason)":
    # the Job's podFailurePolicy replaces them within the attempt (one pod) or fails the Job (a gang); their
    # exits say nothing about the stage
    disrupted: tuple[str, ...] = ()
    started: bool = False  # a pod of the attempt has run (or ended): the attempt is past starting
    start_time: str | None = None  # status.startTime (reset when Kueue unsuspends it), else its creation
    has_pods: bool = False  # any pod of the attempt exists

    @property
    def disrupted_failure(self) -> bool:
        """The Job failed because the cluster disrupted one of its pods (a gang's podFailurePolicy FailJob),
        not because the stage failed: its pods' exits are the consequence (the Job controller stops them)."""
        bad_config = self.termination is not None and self.termination.exit_code == EXIT_BAD_CONFIG
        return (
            self.state == "failed"
            and bool(self.disrupted)
            and self.failure_reason == "PodFailurePolicy"
            and not bad_config
        )


@dataclass(frozen=True)
class TeacherView:
    available: bool
    deleting: bool
    spec_hash: str | None
    ready_replicas: int
    # since when it has not been Available: its creation, or the Available condition's last change to
    # False (a teacher that served for hours and then went unready is timed from then, not from creation)
    unavailable_since: str | None = None
    deadline_exceeded: bool = False  # Progressing=False, ProgressDeadlineExceeded (not Available in time)
    # ReplicaFailure=True: its ReplicaSet cannot create pods (a ResourceQuota, admission); there is no pod
    # to read a waiting reason from, so this is the only place the cause shows
    replica_failure: Waiting | None = None


@dataclass(frozen=True)
class Waiting:
    """Why a stage's pod is not running: a Stalled condition's reason and a message a person can act on."""

    reason: str
    message: str
    pod: str


@dataclass(frozen=True)
class Observed:
    present: frozenset[tuple[str, str]]  # (kind, name) of every child found
    jobs: tuple[JobView, ...] = ()
    live_pods: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stage -> pods not yet finished
    going: frozenset[str] = frozenset()  # pods being deleted (deletionTimestamp set): live, but on their way out
    waiting: dict[str, Waiting] = field(default_factory=dict)  # stage -> why its pods do not run (see waiting)
    teacher: TeacherView | None = None
    pvc: Manifest | None = None
    config_map: Manifest | None = None

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self.present


# The termination-message fields the operator reads, with the JSON type each must have: they are copied
# into the run's status, whose schema the API server enforces, so one value of the wrong type (or a NaN,
# which is not JSON) would make every status patch of the run fail. Anything else in a message is ignored.
MESSAGE_FIELDS: dict[str, str] = {
    "stage": "string",
    "checkpoint": "string",
    "error": "string",
    "step": "integer",
    "reverse_kl": "number",
    "eval_score": "number",
}
MAX_MESSAGE_STRING = 1000  # characters of a string field kept (the status message is cut to this too)


def clip(text: str) -> str:
    """A message as the status, its conditions and Events hold it: its first ``MAX_MESSAGE_STRING`` characters."""
    return text[:MAX_MESSAGE_STRING]


def _checked(value: Any, kind: str) -> tuple[Any, str | None]:
    """``value`` as a status field of JSON type ``kind``, or (None, why not)."""
    if value is None:
        return None, None
    if kind == "string":
        return (value[-MAX_MESSAGE_STRING:], None) if isinstance(value, str) else (None, f"not a string: {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"not a number: {value!r}"
    if not math.isfinite(value):
        return None, f"not a finite number: {value!r}"
    if kind == "integer":
        return (int(value), None) if float(value).is_integer() else (None, f"not an integer: {value!r}")
    return float(value), None


def check_message(message: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The fields of a parsed termination message the operator reads, each of its type, and what was dropped."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, kind in MESSAGE_FIELDS.items():
        value, why = _checked(message.get(key), kind)
        if why is not None:
            dropped.append(f"{key}: {why}"[:200])
        elif value is not None:
            kept[key] = value
    return kept, tuple(dropped)


def parse_message(text: str | None) -> dict[str, Any]:
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"error": text[-1000:]}
    return value if isinstance(value, dict) else {"error": text[-1000:]}


def termination(pod: Manifest) -> Termination | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")
        if term:
            result, dropped = check_message(parse_message(term.get("message")))
            code = term.get("exitCode")
            return Termination(
                exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
                reason=term.get("reason") if isinstance(term.get("reason"), str) else None,
                finished_at=term.get("finishedAt") if isinstance(term.get("finishedAt"), str) else None,
                result=result,
                dropped=dropped,
            )
    return None


def _find(obj: Manifest, type_: str) -> Manifest:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def _condition(obj: Manifest, type_: str) -> bool:
    return _find(obj, type_).get("status") == "True"


# Container waiting reasons (kubelet) that stop a pod for good until someone acts, by Stalled reason.
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})
CRASH_REASONS = frozenset({"CrashLoopBackOff"})


def _claims(pod: Manifest) -> list[str]:
    volumes = (pod.get("spec") or {}).get("volumes") or []
    return [v["persistentVolumeClaim"]["claimName"] for v in volumes if v.get("persistentVolumeClaim")]


def pod_waiting(pod: Manifest, claims: dict[str, Manifest]) -> Waiting | None:
    """Why ``pod`` (not finished) is not running, or None when it runs or is merely starting.

    Once the scheduler has refused the pod (PodScheduled=False): a claim it mounts that is not bound
    (ClaimPending; the scheduler's own message only says "unbound immediate PersistentVolumeClaims"), else
    the scheduler's verdict (Unschedulable, with its message: which resources or labels no node offers).
    A claim that is merely being provisioned, or waits for its first consumer, is not reported: the
    scheduler has not refused anything then. Then the kubelet's container waiting reasons (ImagePullError,
    ContainerConfigError, e.g. a missing Secret, CrashLoopBackOff). A pod Kueue has not admitted yet (its
    scheduling gate) is Queued: it waits its turn, nothing is wrong."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed") or pod["metadata"].get("deletionTimestamp"):
        return None
    # Kueue's pod integration holds a pod it has not admitted with a scheduling gate: queued, not stuck
    gates = {g.get("name") for g in (pod.get("spec") or {}).get("schedulingGates") or []}
    if names.KUEUE_ADMISSION_GATE in gates:
        queue = (pod["metadata"].get("labels") or {}).get(names.KUEUE_QUEUE_LABEL, "?")
        return Waiting("Queued", f"pod {name} waits for admission by Kueue (LocalQueue {queue})", name)
    scheduled = _find(pod, "PodScheduled")
    refused = scheduled.get("status") == "False"
    for claim in _claims(pod) if refused else []:
        pvc = claims.get(claim) or {}
        phase = (pvc.get("status") or {}).get("phase")
        if phase in ("Pending", "Lost"):
            cls = (pvc.get("spec") or {}).get("storageClassName")
            return Waiting(
                "ClaimPending",
                f"pod {name} needs PersistentVolumeClaim {claim}, which is {phase} (not bound; storageClassName "
                f"{cls!r}): no PersistentVolume matches it and no provisioner creates one; check the class "
                "(kubectl describe pvc) or name a bound claim (existingClaim)",
                name,
            )
    if refused and scheduled.get("reason") in ("Unschedulable", "SchedulingGated"):
        why = (scheduled.get("message") or "no node fits").strip()
        return Waiting(str(scheduled["reason"]), clip(f"pod {name} cannot be scheduled: {why}"), name)
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason, detail = waiting.get("reason"), (waiting.get("message") or "").strip()
        for kind, reasons in (
            ("ImagePullError", IMAGE_PULL_REASONS),
            ("ContainerConfigError", CONFIG_REASONS),
            ("CrashLoopBackOff", CRASH_REASONS),
        ):
            if reason in reasons:
                text = f"pod {name} container {cs.get('name')}: {reason}" + (f": {detail}" if detail else "")
                return Waiting(kind, clip(text), name)
    return None


def unlisted_claims(children: dict[str, list[Manifest]]) -> list[str]:
    """Claims that refused pods mount but that are not the run's own (an existingClaim, a model cache):
    the driver reads them by name so ``pod_waiting`` can tell an unbound one."""
    listed = {c["metadata"]["name"] for c in children.get("PersistentVolumeClaim", [])}
    refused = [p for p in children.get("Pod", []) if _find(p, "PodScheduled").get("status") == "False"]
    return sorted({c for p in refused for c in _claims(p)} - listed)


def waiting(pods: list[Manifest], claims: dict[str, Manifest]) -> dict[str, Waiting]:
    """Stage -> why its first stuck pod is not running (pods labelled with their stage)."""
    out: dict[str, Waiting] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        stage = (pod["metadata"].get("labels") or {}).get(names.STAGE_LABEL, "")
        found = None if stage in out else pod_waiting(pod, claims)
        if found is not None:
            out[stage] = found
    return out


def job_state(job: Manifest) -> JobState:
    if _condition(job, "Complete"):
        return "succeeded"
    if _condition(job, "Failed"):
        return "failed"
    return "active"


def _pods_of(job_name: str, pods: list[Manifest]) -> list[Manifest]:
    return [p for p in pods if (p["metadata"].get("labels") or {}).get("job-name") == job_name]


def _index(pod: Manifest) -> int:
    """The pod's completion index in an Indexed Job (0 for a plain Job's only pod)."""
    try:
        return int((pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "0"))
    except ValueError:
        return 0


def gang_termination(terms: list[Termination]) -> Termination | None:
    """What a Job's pods (in index order) say about the attempt: the first failure when any pod failed
    (exit 2, bad configuration, above all: it must not be retried), else pod 0's, which holds rank 0's
    result. The Job controller kills the rest of a gang after a failure; their exits are consequences."""
    failed = [t for t in terms if t.exit_code not in (0, None)]
    bad_config = [t for t in failed if t.exit_code == EXIT_BAD_CONFIG]
    if bad_config or failed:
        return min(bad_config or failed, key=lambda t: t.finished_at or "~")
    return terms[0] if terms else None


def job_view(job: Manifest, pods: list[Manifest]) -> JobView | None:
    meta = job["metadata"]
    labels = meta.get("labels") or {}
    try:
        attempt = int(labels.get(names.ATTEMPT_LABEL, ""))
    except ValueError:
        return None
    mine = sorted(_pods_of(meta["name"], pods), key=_index)
    disrupted = [p for p in mine if _condition(p, "DisruptionTarget")]
    counted = [p for p in mine if p not in disrupted]
    term = gang_termination([t for t in map(termination, counted) if t is not None])
    status = job.get("status") or {}
    ran = [p for p in mine if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")]
    return JobView(
        name=meta["name"],
        stage=labels.get(names.STAGE_LABEL, ""),
        attempt=attempt,
        state=job_state(job),
        deleting=bool(meta.get("deletionTimestamp")),
        spec_hash=(meta.get("annotations") or {}).get(names.SPEC_HASH_ANNOTATION),
        termination=term,
        pods=int((job.get("spec") or {}).get("completions") or 1),
        running=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        failure_reason=_failure_reason(job),
        queue=labels.get(names.KUEUE_QUEUE_LABEL),
        suspended=bool((job.get("spec") or {}).get("suspend")),
        disrupted=tuple(
            f"{p['metadata']['name']} ({_find(p, 'DisruptionTarget').get('reason') or 'DisruptionTarget'})"
            for p in disrupted
        ),
        started=bool(ran) or int(status.get("succeeded") or 0) + int(status.get("failed") or 0) > 0,
        start_time=status.get("startTime") or meta.get("creationTimestamp"),
        has_pods=bool(mine),
    )


def podless_jobs(children: dict[str, list[Manifest]], now: datetime) -> list[Manifest]:
    """Stage Jobs that should have pods by now and have none (active, admitted, not being deleted, started
    at least ``FAILED_CREATE_AFTER_SECONDS`` ago): the driver reads their Events for why (``failed_create``).
    The grace keeps a Job whose pod is merely on its way from costing a LIST."""
    pods = children.get("Pod", [])
    out = []
    for job in children.get("Job", []):
        view = job_view(job, pods)
        if view is None or view.state != "active" or view.deleting or view.suspended or view.has_pods:
            continue
        started = parse_time(view.start_time)
        if started is not None and (now - started).total_seconds() >= FAILED_CREATE_AFTER_SECONDS:
            out.append(job)
    return out


def failed_create(job: Manifest, events: Sequence[Manifest]) -> Waiting | None:
    """The Job controller's latest FailedCreate Event about ``job`` (the API server refused its pod: a
    ResourceQuota, a LimitRange, a policy webhook), as a Stalled reason with the API server's message."""
    refused = [e for e in events if e.get("reason") == "FailedCreate"]
    if not refused:
        return None
    last = max(refused, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    name = job["metadata"]["name"]
    text = str(last.get("message") or "").strip()
    return Waiting(
        "FailedCreate",
        clip(
            f"Job {name} cannot create its pods: {text} (fix the quota or policy, or lower the stage's resources; "
            "the Job controller keeps retrying)"
        ),
        name,
    )


def _failure_reason(job: Manifest) -> str | None:
    """Why the Job failed or is failing: the Job controller sets FailureTarget (e.g. DeadlineExceeded) and
    stops the pods before it sets Failed with the same reason."""
    for type_ in ("Failed", "FailureTarget"):
        found = _find(job, type_)
        if found.get("status") == "True":
            return str(found.get("reason") or "") or None
    return None


def _replica_failure(deployment: Manifest) -> Waiting | None:
    found = _find(deployment, "ReplicaFailure")
    if found.get("status") != "True":
        return None
    name = deployment["metadata"]["name"]
    why = f"{found.get('reason') or 'ReplicaFailure'}: {(found.get('message') or '').strip()}"
    return Waiting("FailedCreate", clip(f"Deployment {name} cannot create pods: {why}"), name)


def teacher_view(deployment: Manifest) -> TeacherView:
    meta, status = deployment["metadata"], deployment.get("status") or {}
    current = status.get("observedGeneration", 0) >= meta.get("generation", 0)
    return TeacherView(
        available=current and _condition(deployment, "Available") and (status.get("availableReplicas") or 0) > 0,
        deleting=bool(meta.get("deletionTimestamp")),
        spec_hash=(meta.get("annotations") or {}).get(names.SPEC_HASH_ANNOTATION),
        ready_replicas=status.get("readyReplicas") or 0,
        unavailable_since=max(
            [t for t in (meta.get("creationTimestamp"), _find(deployment, "Available").get("lastTransitionTime")) if t],
            default=None,
        ),
        deadline_exceeded=_find(deployment, "Progressing").get("reason") == "ProgressDeadlineExceeded",
        replica_failure=_replica_failure(deployment),
    )


def observe(
    run_name: str,
    children: dict[str, list[Manifest]],
    claims: Sequence[Manifest] = (),
    refused: Sequence[Waiting] = (),
) -> Observed:
    """Fold the run's children (``kind -> objects`` labelled with the run) into an ``Observed``; ``claims``:
    other PersistentVolumeClaims its pods mount (an existingClaim, a model cache), read by name; ``refused``:
    ``failed_create`` of the run's pod-less Jobs (a pod-less Job has no pod to say why it waits)."""
    present = frozenset((kind, o["metadata"]["name"]) for kind, objs in children.items() for o in objs)
    pods = children.get("Pod", [])
    jobs = tuple(v for v in (job_view(j, pods) for j in children.get("Job", [])) if v is not None)
    live: dict[str, list[str]] = {}
    for pod in pods:
        if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            stage = (pod["metadata"].get("labels") or {}).get(names.STAGE_LABEL, "")
            live.setdefault(stage, []).append(pod["metadata"]["name"])
    deployment = next(
        (d for d in children.get("Deployment", []) if d["metadata"]["name"] == names.teacher(run_name)), None
    )
    pvc = next(
        (
            p
            for p in children.get("PersistentVolumeClaim", [])
            if p["metadata"]["name"] == names.workspace_claim(run_name)
        ),
        None,
    )
    by_name = {c["metadata"]["name"]: c for c in [*children.get("PersistentVolumeClaim", []), *claims]}
    cm = next(
        (c for c in children.get("ConfigMap", []) if c["metadata"]["name"] == names.spec_configmap(run_name)), None
    )
    return Observed(
        present=present,
        jobs=jobs,
        live_pods={k: tuple(v) for k, v in live.items()},
        going=frozenset(p["metadata"]["name"] for p in pods if p["metadata"].get("deletionTimestamp")),
        waiting={**_by_stage(refused, jobs), **waiting(pods, by_name)},
        teacher=teacher_view(deployment) if deployment else None,
        pvc=pvc,
        config_map=cm,
    )


def _by_stage(refused: Sequence[Waiting], jobs: Sequence[JobView]) -> dict[str, Waiting]:
    stage_of = {j.name: j.stage for j in jobs}
    return {stage_of[w.pod]: w for w in refused if w.pod in stage_of}
