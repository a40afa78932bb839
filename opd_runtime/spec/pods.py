"""What a run gives its pods besides the command: environment, credentials, scheduling inputs.

The same fields exist at run level (``spec.pod``) and per stage (``spec.<stage>.pod``,
``spec.teacher.serving.pod``); ``merged`` says how a stage's value combines with the run's.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import ConfigDict, Field, model_validator

from .base import SpecModel

# Kubernetes' resource.Quantity, as the other size fields of the spec check it.
SIZE = r"^[0-9]+(\.[0-9]+)?(k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# A Kueue LocalQueue name: an object name (DNS-1123 subdomain) that is also a label value (at most 63).
QUEUE_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# Variables the operator sets in every stage container: a user value would silently replace (or be
# replaced by) the operator's, and the stage would report to the wrong run or cache in the wrong place.
RESERVED_ENV_PREFIX = "OPD_"
RESERVED_ENV = frozenset({"HF_HOME"})


class KeyRef(SpecModel):
    name: str = Field(min_length=1, description="Name of the Secret or ConfigMap (in the run's namespace).")
    key: str = Field(min_length=1, description="Key within it.")
    optional: bool = Field(False, description="Start the pod even when the object or key is missing.")


def _cel(rule: str, message: str) -> ConfigDict:
    """The CEL twin of a model validator, for the CRD (operator/openapi.py copies it wherever the model
    appears): the API server then refuses at apply what ``opd validate`` refuses, at the same field."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": [{"rule": rule, "message": message}]})


class EnvValueFrom(SpecModel):
    model_config = _cel(
        "has(self.secretKeyRef) != has(self.configMapKeyRef)", "set exactly one of `secretKeyRef` and `configMapKeyRef`"
    )
    secret_key_ref: KeyRef | None = Field(None, description="Take the value from a key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(None, description="Take the value from a key of a ConfigMap.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of `secretKeyRef` and `configMapKeyRef`")
        return self


class EnvVar(SpecModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.value) && has(self.valueFrom))",
                    "message": "set `value` or `valueFrom`, not both",
                },
                {
                    "rule": f"!self.name.startsWith('{RESERVED_ENV_PREFIX}') && "
                    + " && ".join(f"self.name != '{n}'" for n in sorted(RESERVED_ENV)),
                    "message": f"the operator sets {RESERVED_ENV_PREFIX}* and {', '.join(sorted(RESERVED_ENV))} in "
                    "every stage container (run identity, caches); use another name",
                },
            ]
        }
    )
    name: str = Field(pattern=ENV_NAME, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: EnvValueFrom | None = Field(None, description="Value read from a Secret or ConfigMap key.")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: set `value` or `valueFrom`, not both")
        if self.name.startswith(RESERVED_ENV_PREFIX) or self.name in RESERVED_ENV:
            raise ValueError(
                f"env {self.name}: the operator sets {RESERVED_ENV_PREFIX}* and {', '.join(sorted(RESERVED_ENV))} "
                "in every stage container (run identity, caches); use another name"
            )
        return self

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ObjectRef(SpecModel):
    name: str = Field(min_length=1, description="Name of the Secret or ConfigMap (in the run's namespace).")
    optional: bool = Field(False, description="Start the pod even when it is missing.")


class EnvFromSource(SpecModel):
    model_config = _cel(
        "has(self.secretRef) != has(self.configMapRef)", "envFrom: set exactly one of `secretRef` and `configMapRef`"
    )
    secret_ref: ObjectRef | None = Field(
        None, description="Every key of this Secret becomes a variable (e.g. a Secret holding HF_TOKEN)."
    )
    config_map_ref: ObjectRef | None = Field(None, description="Every key of this ConfigMap becomes a variable.")
    prefix: str | None = Field(None, pattern=ENV_NAME, description="Prepended to every variable name.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("envFrom: set exactly one of `secretRef` and `configMapRef`")
        return self

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


MERGE_RULE = (
    "Merged with the run's `spec.pod`: `env` by name (the stage's entry wins), `envFrom`, "
    "`imagePullSecrets` and `tolerations` appended to the run's, `nodeSelector` by key (the stage's wins), "
    "`priorityClassName`, `runtimeClassName`, `affinity` and `shmSize` replaced when set here; `labels` and "
    "`annotations` by key (the stage's wins); `schedulerName` and `gpuResourceName` replaced when set here."
)
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# An extended resource name: a domain-prefixed name (nvidia.com/gpu, nvidia.com/mig-1g.10gb, amd.com/gpu).
GPU_RESOURCE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


class PodSpecInputs(SpecModel):
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Environment variables of the stage container: `value`, or `valueFrom.secretKeyRef` / "
        "`valueFrom.configMapKeyRef`. Names starting with OPD_ and HF_HOME are the operator's.",
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list,
        description="Secrets / ConfigMaps whose keys all become variables (`secretRef` or `configMapRef`, "
        "optional `prefix`), e.g. a Secret with HF_TOKEN for gated hub models. A missing one (not `optional`) "
        "keeps the pod from starting: the run shows Stalled=True, reason ContainerConfigError.",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Names of docker-registry Secrets used to pull the runtime image."
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods (preemption order).")
    runtime_class_name: str | None = Field(None, description="RuntimeClass of the pods (e.g. `nvidia`).")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods require (added to `spec.nodeSelector`)."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Pod tolerations, as in a Pod spec (added to `spec.tolerations`); passed through unchecked.",
    )
    affinity: dict[str, Any] | None = Field(
        None,
        description="Pod affinity, exactly as a Pod's `affinity` (nodeAffinity, podAffinity, podAntiAffinity); "
        "passed through unchecked by the operator, the API server validates it when the Job is created.",
    )
    shm_size: str | None = Field(
        None,
        pattern=SIZE,
        description="Size limit of /dev/shm (an in-memory emptyDir, counted against the pod's memory), e.g. "
        "`16Gi`; NCCL and dataloader workers use it. Empty: no limit of its own (the pod's memory limit applies).",
    )

    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels added to the pods (e.g. `kueue.x-k8s.io/priority-class`, a cost centre, a "
        "sidecar opt-out). The operator's own labels (app.kubernetes.io/*, opd.dev/*) win over these.",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations added to the pods (e.g. a topology-aware scheduling request, a service "
        "mesh opt-out); the operator's own (opd.dev/*) win over these.",
    )
    scheduler_name: str | None = Field(
        None,
        max_length=253,
        description="Scheduler of the pods (e.g. `volcano` for gang scheduling); empty: the default scheduler.",
    )
    gpu_resource_name: str | None = Field(
        None,
        pattern=GPU_RESOURCE,
        max_length=253,
        description="Extended resource that `resources.gpus` requests, e.g. `nvidia.com/mig-1g.10gb` for a "
        f"MIG slice or `amd.com/gpu`. Empty: `{DEFAULT_GPU_RESOURCE}`.",
    )

    def merged(self, stage: PodSpecInputs | None) -> PodSpecInputs:
        """These run-level inputs with a stage's own on top (``MERGE_RULE``)."""
        if stage is None:
            return self
        env = {e.name: e for e in self.env} | {e.name: e for e in stage.env}
        return PodSpecInputs.model_validate(
            {
                "env": list(env.values()),
                "env_from": [*self.env_from, *stage.env_from],
                "image_pull_secrets": list(dict.fromkeys([*self.image_pull_secrets, *stage.image_pull_secrets])),
                "priority_class_name": stage.priority_class_name or self.priority_class_name,
                "runtime_class_name": stage.runtime_class_name or self.runtime_class_name,
                "node_selector": {**self.node_selector, **stage.node_selector},
                "tolerations": [*self.tolerations, *stage.tolerations],
                "affinity": stage.affinity if stage.affinity is not None else self.affinity,
                "shm_size": stage.shm_size or self.shm_size,
                "labels": {**self.labels, **stage.labels},
                "annotations": {**self.annotations, **stage.annotations},
                "scheduler_name": stage.scheduler_name or self.scheduler_name,
                "gpu_resource_name": stage.gpu_resource_name or self.gpu_resource_name,
            }
        )
