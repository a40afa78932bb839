"""The DistillationRun resource and loading it from a file with errors a person can act on."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import ConfigDict, Field, ValidationError, model_validator

from ..contract import (
    API_VERSION,
    BATCH_STAGES,
    CONTROLLER_NAME_PATTERN,
    DEFAULT_CONTROLLER,
    KIND,
    MAX_RUN_NAME_LENGTH,
    RUN_NAME_PATTERN,
)
from .base import SpecModel
from .models import QUANTITY, SINGLE_NODE_ACCESS, AccessMode, ModelSpec, TeacherSpec
from .pods import QUEUE_NAME, PodSpecInputs
from .stages import DistillSpec, EvalSpec, SftSpec


class WorkspaceSpec(SpecModel):
    size: str = Field(
        "200Gi", pattern=QUANTITY, description="Size of the workspace PVC holding checkpoints, metrics and results."
    )
    storage_class_name: str | None = Field(
        None, description="StorageClass of the workspace PVC (cluster default if empty)."
    )
    access_modes: list[AccessMode] = Field(
        default_factory=lambda: list[AccessMode](["ReadWriteOnce"]), description="Access modes of the workspace PVC."
    )
    existing_claim: str | None = Field(None, description="Use this existing PVC instead of creating one.")
    retention_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="What happens to the workspace PVC when the run is deleted."
    )


class DistillationRunSpec(SpecModel):
    student: ModelSpec = Field(description="The model being trained.")
    teacher: TeacherSpec = Field(description="The model whose per-token log-probs the student learns to match.")
    image: str = Field("ghcr.io/opd-dev/opd-runtime:0.1.0", description="Runtime image every stage runs in.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of stage images."
    )
    workspace: WorkspaceSpec = Field(default_factory=WorkspaceSpec, description="Where checkpoints and results live.")
    sft: SftSpec | None = Field(None, description="Stage 1: supervised fine-tuning on teacher traces.")
    distill: DistillSpec | None = Field(None, description="Stage 2: on-policy distillation from the teacher.")
    eval: EvalSpec | None = Field(None, description="Stage 3: accuracy on held-out problem sets.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector for stage pods.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations for stage pods.")
    pod: PodSpecInputs = Field(
        default_factory=PodSpecInputs,
        description="Pod inputs of every stage Job and the teacher Deployment (env, envFrom, imagePullSecrets, "
        "priorityClassName, runtimeClassName, nodeSelector, tolerations, affinity, shmSize); a stage's own "
        "`pod` (spec.<stage>.pod, spec.teacher.serving.pod) is merged on top. Kubernetes only: `opd run` "
        "ignores them.",
    )
    queue_name: str | None = Field(
        None,
        pattern=QUEUE_NAME,
        max_length=63,
        description="Kueue LocalQueue (in the run's namespace) that admits this run's workloads: set as the "
        "label `kueue.x-k8s.io/queue-name` on every stage Job and on the teacher Deployment and its pods (Kueue's "
        "Deployment integration admits each teacher pod on its own; spec.teacher.serving.queueName overrides "
        "the queue there). Stage Jobs are then "
        "created suspended and Kueue alone changes `Job.spec.suspend`: it unsuspends a Job it admits and "
        "suspends it again when it preempts it. The run's status shows each stage Queued, Admitted or Evicted "
        "(the Admitted condition, stages.<stage>.queue); an eviction is not a failure: the stage resumes from "
        "its last checkpoint once admitted again. Time spent queued counts neither against a stage's "
        "timeoutSeconds nor the teacher's readyTimeoutSeconds. Needs Kueue's `batch/job` integration (and "
        "`deployment` for the teacher) and a LocalQueue of this name; without Kueue in the cluster, a Job "
        "created suspended waits forever (the run says Queued). Unset: no Kueue label, Jobs start at once. "
        "Kubernetes only.",
    )
    managed_by: str | None = Field(
        None,
        pattern=CONTROLLER_NAME_PATTERN,
        max_length=63,
        description="The controller that acts on this run, as a domain-prefixed path. Unset: the opd "
        f"operator started with the default controller name `{DEFAULT_CONTROLLER}`. An operator started "
        "with `--controller-name NAME` (the chart's `controllerName`) acts only on runs whose managedBy is "
        "NAME and leaves every other run untouched (no finalizer, no status, no children), so two installs "
        "on one cluster (say one cluster-wide and one namespaced) never both act on one run. Immutable: "
        "set it when creating the run. Kubernetes only.",
    )
    suspend: bool = Field(
        False,
        description="Pause the run: its stage Jobs and the teacher are deleted (their pods stop; with Kueue "
        "this also gives their quota back, and the operator never writes a Job's spec.suspend, which Kueue "
        "owns), the workspace is kept; unsetting it starts each unfinished stage again as a new attempt "
        "(not counted as a failure) that resumes from its last checkpoint, with the spec as it is then.",
    )
    start_timeout_seconds: int = Field(
        3600,
        ge=1,
        le=7 * 24 * 3600,
        description="Seconds a stage attempt may wait for its first pod to run, counted from its Job's start "
        "(time queued in Kueue does not count). Default 3600 (one hour): long enough for a GPU node to be "
        "added by an autoscaler and a large image to be pulled, short enough that a stage whose pods the API "
        "server refuses (a ResourceQuota, a policy webhook; the run shows Stalled with reason FailedCreate), "
        "that no node can take (Unschedulable) or whose image cannot be pulled does not wait forever. When it "
        "passes, the attempt's Job is deleted and the attempt counts as a failure (its message names what it "
        "waited for), retried per spec.retries. The stage's timeoutSeconds, when set, bounds the whole attempt. "
        "Kubernetes only.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Seconds after the run finished (status.completionTime, phase Succeeded or Failed) "
        "when the operator deletes its children: stage Jobs and their pods, the teacher, Services, the "
        "NetworkPolicy, the run's ConfigMap, ServiceAccount, Role and RoleBinding. The run itself stays, with "
        "its status and results (status.childrenDeletedTime says when). The workspace PVC goes too only "
        "with workspace.retentionPolicy Delete (never an existingClaim). Unset: the operator's default "
        "(the chart's `operator.ttlSecondsAfterFinished`; none there keeps the children until the run is "
        "deleted). Editing the spec of a finished run starts it again as any edit does. Kubernetes only.",
    )
    retries: int = Field(
        2,
        ge=0,
        le=20,
        description="Times a failed stage is started again (from its last "
        "checkpoint) before the run fails. A stage that exits with code 2 (bad configuration) "
        "is not retried until the spec changes.",
    )
    backoff_seconds: int = Field(
        10,
        ge=0,
        le=3600,
        description="Seconds before the first retry of a failed "
        "stage; each further retry waits twice as long (at most 10 minutes).",
    )

    @model_validator(mode="after")
    def _some_stage(self) -> Self:
        if not any(s is not None and s.enabled for s in (self.sft, self.distill, self.eval)):
            raise ValueError("enable at least one of the stages `sft`, `distill`, `eval`")
        return self

    @model_validator(mode="after")
    def _eval_targets_are_run(self) -> Self:
        # eval scores the final model of the stages it names; one this run does not produce would make the
        # eval stage fail only after SFT and OPD have run, hours later
        if self.eval is None or not self.eval.enabled:
            return self
        enabled = self.enabled_stages()
        for target in self.eval.targets:
            if target in BATCH_STAGES and target not in enabled:
                raise ValueError(
                    f"eval.targets names `{target}`, a stage this run does not enable: enable spec.{target} "
                    f"or remove `{target}` from spec.eval.targets"
                )
        return self

    @model_validator(mode="after")
    def _workspace_reachable_by_every_node(self) -> Self:
        # Every rank of a multi-node stage writes the workspace (checkpoint shards). `resources.nodes` is
        # read with getattr so this check holds from the moment the multi-node field lands in ResourcesSpec.
        for name in ("sft", "distill"):
            stage = getattr(self, name)
            nodes = getattr(stage.resources, "nodes", 1) if stage is not None and stage.enabled else 1
            if nodes > 1 and SINGLE_NODE_ACCESS.issuperset(self.workspace.access_modes):
                raise ValueError(
                    f"{name}.resources.nodes {nodes} puts the stage on {nodes} nodes, but "
                    f"workspace.accessModes {self.workspace.access_modes} let only one node mount the "
                    "workspace: the other ranks would wait forever (Multi-Attach). Set `workspace.accessModes: "
                    "[ReadWriteMany]` with a storageClassName that provides it (or an existingClaim that is "
                    f"ReadWriteMany), or `{name}.resources.nodes: 1`"
                )
        return self

    @model_validator(mode="after")
    def _sidecar_port_free(self) -> Self:
        # a sidecar teacher shares the distill pod's network namespace with the learner's metrics endpoint
        serving, d = self.teacher.serving, self.distill
        if serving.placement == "sidecar" and d is not None and d.enabled and d.metrics_port == serving.port:
            raise ValueError(
                f"teacher.serving.port {serving.port} is also distill.metricsPort: with placement `sidecar` the "
                "teacher and the learner share one pod's ports; change one of them"
            )
        return self

    def enabled_stages(self) -> list[str]:
        return [name for name in BATCH_STAGES if getattr(self, name) is not None and getattr(self, name).enabled]

    def notes(self) -> list[str]:
        """What validation says about a valid spec: fields that are set but have no effect in this run."""
        d = self.distill
        if d is None or not d.enabled or d.objective != "rl":
            return []
        evals_teacher = self.eval is not None and self.eval.enabled and "teacher" in self.eval.targets
        model_use = (
            "spec.teacher.model is used only by eval target `teacher`"
            if evals_teacher
            else "spec.teacher.model is not used by this run"
        )
        return [
            "spec.distill.objective rl: the reward is the graded answer, so no teacher is served, loaded or "
            "contacted for the distill stage; ignored: spec.teacher.backend, spec.teacher.serving, "
            f"spec.teacher.tokenizer, spec.distill.klCoef, spec.distill.discount ({model_use})"
        ]


class Metadata(SpecModel):
    name: str = Field(
        "run",
        pattern=RUN_NAME_PATTERN,
        max_length=MAX_RUN_NAME_LENGTH,
        description=f"Run name: lowercase letters, digits and '-', starting with a letter, at most "
        f"{MAX_RUN_NAME_LENGTH} characters (the names of its Jobs, pods and teacher Service are derived from it).",
    )
    namespace: str | None = Field(None, description="Namespace.")
    model_config = SpecModel.model_config | ConfigDict(extra="ignore")


class DistillationRun(SpecModel):
    api_version: Literal["opd.dev/v1alpha1"] = Field(API_VERSION, description="opd.dev/v1alpha1")
    kind: Literal["DistillationRun"] = Field(KIND, description="DistillationRun")
    metadata: Metadata = Field(default_factory=Metadata, description="Object metadata.")
    spec: DistillationRunSpec = Field(description="What to train, from what, and how.")
    model_config = SpecModel.model_config | ConfigDict(extra="ignore")  # status and other server fields


class SpecError(ValueError):
    """A DistillationRun file that cannot be used; the message names each bad field and its fix."""


def _field_names(model: type[SpecModel], loc: tuple[int | str, ...]) -> list[str]:
    """Wire names allowed at ``loc`` (used to suggest a fix for a misspelt field)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = next((f for n, f in current.model_fields.items() if f.alias == part or n == part), None)
        if field is None:
            return []
        ann = field.annotation
        current = next(
            (a for a in (*getattr(ann, "__args__", (ann,)), ann) if isinstance(a, type) and issubclass(a, SpecModel)),
            None,
        )
        if current is None:
            args = getattr(ann, "__args__", ())
            current = next((getattr(a, "__args__", (None,))[0] for a in args if getattr(a, "__args__", None)), None)
            if not (isinstance(current, type) and issubclass(current, SpecModel)):
                return []
    return [f.alias or n for n, f in current.model_fields.items()] if current else []


def format_errors(err: ValidationError, root: type[SpecModel] | None = None) -> str:
    root = root or DistillationRun
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            names = _field_names(root, loc)
            close = difflib.get_close_matches(str(loc[-1]), names, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"allowed fields: {', '.join(names)}"
            lines.append(f"{where}: unknown field; {hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required field is missing; add it")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"{where}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_run(data: Any, *, source: str = "<input>") -> DistillationRun:
    """Validate a DistillationRun given as a manifest dict (or a bare spec dict)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a DistillationRun mapping, got {type(data).__name__}")
    if "spec" not in data and ("student" in data or "teacher" in data):
        data = {"spec": data}
    if data.get("kind", KIND) != KIND:
        raise SpecError(f"{source}: kind: expected {KIND}, got {data.get('kind')!r}")
    try:
        return DistillationRun.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: invalid DistillationRun:\n" + format_errors(err)) from None


def load_run(path: str | Path) -> DistillationRun:
    import yaml

    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind", KIND) == KIND]
    if len(runs) != 1:
        raise SpecError(f"{path}: expected exactly one DistillationRun document, found {len(runs)}")
    return parse_run(runs[0], source=str(path))
