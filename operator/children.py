"""The objects a DistillationRun should have, as plain manifests (pure functions, no cluster).

Every stage container runs exactly ``opd_runtime.plan.stage_command(...).argv``: the same command line
``opd run`` starts locally. Pods satisfy Pod Security ``restricted``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from opd_runtime.plan import planned_stages, stage_command
from opd_runtime.spec import DistillationRun, ResourcesSpec

from . import names
from .rbac import stage_rules

Manifest = dict[str, Any]
# Fields that change how the operator drives the run, not what a stage computes: editing them never
# conflicts with a running stage.
OPERATIONAL_FIELDS = ("suspend", "retries", "backoffSeconds")


def _meta(
    obj: Manifest, name: str, stage: str | None = None, *, owned: bool = True, annotations: dict[str, str] | None = None
) -> Manifest:
    meta: Manifest = {
        "name": name,
        "namespace": obj["metadata"]["namespace"],
        "labels": names.labels(obj["metadata"]["name"], stage),
    }
    if owned:
        meta["ownerReferences"] = [names.owner_reference(obj)]
    if annotations:
        meta["annotations"] = annotations
    return meta


def stage_spec(run: DistillationRun) -> dict[str, Any]:
    """The spec as stages see it: without the operational fields and the workspace retention policy."""
    spec = run.spec.to_wire()
    for key in OPERATIONAL_FIELDS:
        spec.pop(key, None)
    spec["workspace"].pop("retentionPolicy", None)
    return spec


def spec_hash(run: DistillationRun) -> str:
    return hashlib.sha256(json.dumps(stage_spec(run), sort_keys=True).encode()).hexdigest()[:16]


def run_yaml(run: DistillationRun, namespace: str) -> str:
    """The run file stages read from /etc/opd/run.yaml."""
    doc = {
        "apiVersion": run.api_version,
        "kind": run.kind,
        "metadata": {"name": run.metadata.name, "namespace": namespace},
        "spec": stage_spec(run),
    }
    return yaml.safe_dump(doc, sort_keys=False)


# ---- per-run plumbing ---------------------------------------------------------------------------------


def workspace_pvc(obj: Manifest, run: DistillationRun) -> Manifest:
    """The workspace claim; owned by the run (so deleted with it) only under retentionPolicy Delete."""
    ws = run.spec.workspace
    spec: Manifest = {"accessModes": list(ws.access_modes), "resources": {"requests": {"storage": ws.size}}}
    if ws.storage_class_name:
        spec["storageClassName"] = ws.storage_class_name
    name = names.workspace_claim(obj["metadata"]["name"])
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(obj, name, owned=ws.retention_policy == "Delete"),
        "spec": spec,
    }


def config_map(obj: Manifest, run: DistillationRun) -> Manifest:
    name = names.spec_configmap(obj["metadata"]["name"])
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(obj, name, annotations={names.SPEC_HASH_ANNOTATION: spec_hash(run)}),
        "data": {names.CONFIG_FILE: run_yaml(run, obj["metadata"]["namespace"])},
    }


def service_account(obj: Manifest) -> Manifest:
    name = names.stage_account(obj["metadata"]["name"])
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(obj, name),
        "automountServiceAccountToken": True,
    }


def role(obj: Manifest) -> Manifest:
    run = obj["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(obj, names.stage_account(run)),
        "rules": stage_rules(run),
    }


def role_binding(obj: Manifest) -> Manifest:
    run, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
    account = names.stage_account(run)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(obj, account),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
    }


def plumbing(obj: Manifest, run: DistillationRun) -> list[Manifest]:
    """What every run needs before its first stage, in creation order."""
    out = [service_account(obj), role(obj), role_binding(obj), config_map(obj, run)]
    if not run.spec.workspace.existing_claim:
        out.append(workspace_pvc(obj, run))
    return out


# ---- pods -----------------------------------------------------------------------------------------------


def pod_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": names.RUN_AS_USER,
        "runAsGroup": names.RUN_AS_USER,
        "fsGroup": names.RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(spec: ResourcesSpec) -> Manifest:
    """Requests equal limits: cpu/memory as given, ``nvidia.com/gpu`` when the stage wants GPUs."""
    amounts: dict[str, str] = {}
    if spec.cpu:
        amounts["cpu"] = spec.cpu
    if spec.memory:
        amounts["memory"] = spec.memory
    if spec.gpus:
        amounts["nvidia.com/gpu"] = str(spec.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def teacher_resources(run: DistillationRun) -> ResourcesSpec:
    serving = run.spec.teacher.serving
    return serving.resources or ResourcesSpec.model_validate({"gpus": serving.tensor_parallel_size})


def _volumes(obj: Manifest, run: DistillationRun) -> list[Manifest]:
    claim = run.spec.workspace.existing_claim or names.workspace_claim(obj["metadata"]["name"])
    return [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "spec", "configMap": {"name": names.spec_configmap(obj["metadata"]["name"])}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


_MOUNTS: list[Manifest] = [
    {"name": "workspace", "mountPath": names.WORKSPACE_MOUNT},
    {"name": "spec", "mountPath": names.CONFIG_DIR, "readOnly": True},
    {"name": "dshm", "mountPath": "/dev/shm"},
]


def _env(obj: Manifest, extra: dict[str, str]) -> list[Manifest]:
    env = {
        **extra,
        "OPD_RUN_NAME": obj["metadata"]["name"],
        "OPD_RUN_NAMESPACE": obj["metadata"]["namespace"],
        "OPD_TERMINATION_LOG": names.TERMINATION_LOG,
        "OPD_CACHE_DIR": f"{names.WORKSPACE_MOUNT}/.cache/opd",
        "HF_HOME": f"{names.WORKSPACE_MOUNT}/.cache/huggingface",
    }
    return [{"name": k, "value": v} for k, v in env.items()]


def _container(
    obj: Manifest, run: DistillationRun, stage: str, argv: tuple[str, ...], env: dict[str, str], res: ResourcesSpec
) -> Manifest:
    return {
        "name": stage,
        "image": run.spec.image,
        "imagePullPolicy": run.spec.image_pull_policy,
        "command": list(argv),
        "env": _env(obj, env),
        "resources": resources(res),
        "volumeMounts": [dict(m) for m in _MOUNTS],
        "terminationMessagePath": names.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }


def _pod_spec(obj: Manifest, run: DistillationRun, container: Manifest, *, account: str | None) -> Manifest:
    spec: Manifest = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": _volumes(obj, run),
    }
    if account:
        spec["serviceAccountName"] = account
    else:
        spec["automountServiceAccountToken"] = False
    if run.spec.node_selector:
        spec["nodeSelector"] = dict(run.spec.node_selector)
    if run.spec.tolerations:
        spec["tolerations"] = [dict(t) for t in run.spec.tolerations]
    return spec


def stage_job(obj: Manifest, run: DistillationRun, stage: str, attempt: int) -> Manifest:
    """The Job of one attempt of a batch stage (``sft``, ``distill``, ``eval``); Kubernetes never retries
    it (backoffLimit 0): the operator decides about retries."""
    run_name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
    teacher_url = None
    if stage == "distill" and "teacher" in planned_stages(run):
        teacher_url = names.teacher_url(run_name, ns, run.spec.teacher.serving.port)
    cmd = stage_command(run, stage, config=names.CONFIG_PATH, workspace=names.WORKSPACE_MOUNT, teacher_url=teacher_url)
    container = _container(obj, run, stage, cmd.argv, cmd.env, getattr(run.spec, stage).resources)
    if stage == "distill" and run.spec.distill and run.spec.distill.metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": run.spec.distill.metrics_port}]
    pod_labels = {**names.labels(run_name, stage), names.ATTEMPT_LABEL: str(attempt)}
    pod_spec = _pod_spec(obj, run, container, account=names.stage_account(run_name))
    pod_spec["restartPolicy"] = "Never"
    meta = _meta(
        obj, names.job(run_name, stage, attempt), stage, annotations={names.SPEC_HASH_ANNOTATION: spec_hash(run)}
    )
    meta["labels"][names.ATTEMPT_LABEL] = str(attempt)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def teacher_deployment(obj: Manifest, run: DistillationRun) -> Manifest:
    run_name = obj["metadata"]["name"]
    serving = run.spec.teacher.serving
    cmd = stage_command(run, "teacher", config=names.CONFIG_PATH, workspace=names.WORKSPACE_MOUNT, port=serving.port)
    container = _container(obj, run, "teacher", cmd.argv, cmd.env, teacher_resources(run))
    container["ports"] = [{"name": "http", "containerPort": serving.port}]
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    # Loading a large model takes minutes: a long startup budget, then quick readiness checks.
    container["startupProbe"] = {**probe, "failureThreshold": 180}
    container["readinessProbe"] = {**probe, "failureThreshold": 3}
    pod_labels = names.labels(run_name, "teacher")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            obj, names.teacher(run_name), "teacher", annotations={names.SPEC_HASH_ANNOTATION: spec_hash(run)}
        ),
        "spec": {
            "replicas": serving.replicas,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {names.RUN_LABEL: run_name, names.STAGE_LABEL: "teacher"}},
            "template": {"metadata": {"labels": pod_labels}, "spec": _pod_spec(obj, run, container, account=None)},
        },
    }


def teacher_service(obj: Manifest, run: DistillationRun) -> Manifest:
    run_name = obj["metadata"]["name"]
    port = run.spec.teacher.serving.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(obj, names.teacher(run_name), "teacher"),
        "spec": {
            "selector": {names.RUN_LABEL: run_name, names.STAGE_LABEL: "teacher"},
            "ports": [{"name": "http", "port": port, "targetPort": "http"}],
        },
    }
