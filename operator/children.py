"""The objects a DistillationRun should have, as plain manifests (pure functions, no cluster).

Every stage container runs exactly ``opd_runtime.plan.stage_command(...).argv``: the same command line
``opd run`` starts locally. Pods satisfy Pod Security ``restricted``.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import yaml

from opd_runtime.contract import EXIT_BAD_CONFIG, TEACHER_API_KEY_ENV, TRAINING_STAGES
from opd_runtime.memory_plan import problems as memory_problems
from opd_runtime.plan import (
    RENDEZVOUS_PORT,
    launcher_argv,
    planned_stages,
    processes_per_pod,
    serves_teacher,
    stage_command,
    teacher_resources,
)
from opd_runtime.positions import context_problems
from opd_runtime.spec import DistillationRun, ResourcesSpec
from opd_runtime.spec.models import MODEL_CACHE_MOUNT
from opd_runtime.spec.pods import DEFAULT_GPU_RESOURCE, PodSpecInputs

from . import names
from .rbac import stage_rules

Manifest = dict[str, Any]
PROBE_PERIOD_S = 10  # the teacher's /health probes
PROBE_TIMEOUT_S = 5  # one /health request of a sidecar teacher's exec probe
LOOPBACK = "127.0.0.1"  # where a sidecar teacher listens: reachable from its own pod only
# Fields that change how the operator drives the run, not what a stage computes: editing them never
# conflicts with a running stage.
OPERATIONAL_FIELDS = (
    "suspend",
    "retries",
    "backoffSeconds",
    "queueName",
    "managedBy",
    "ttlSecondsAfterFinished",
    "startTimeoutSeconds",
)


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
    spec["teacher"]["serving"].pop("queueName", None)  # which Kueue queue admits it: not what it serves
    spec["teacher"]["serving"].pop("networkPolicy", None)  # who may reach the teacher: not what it serves
    return spec


def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def spec_hash(run: DistillationRun) -> str:
    """What a stage computes, as a digest: the spec without operational fields and without any field at
    its default value, so a release that adds a defaulted field (or a CRD that defaults it) leaves the
    digest of every existing run as it was, and restarts nothing."""
    spec = run.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    for key in OPERATIONAL_FIELDS:
        spec.pop(key, None)
    spec.get("workspace", {}).pop("retentionPolicy", None)
    serving = spec.get("teacher", {}).get("serving", {})
    for key in ("queueName", "networkPolicy"):
        serving.pop(key, None)
    return _digest(spec)


def same_spec(digest: str | None, run: DistillationRun) -> bool:
    """Whether a child annotated with ``digest`` runs ``run``'s current spec: ``spec_hash``, or the digest
    of the whole defaulted spec that operators before ``spec_hash`` wrote (children they started keep
    running after an upgrade)."""
    return digest in (spec_hash(run), _digest(stage_spec(run)))


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


def deploys_teacher(run: DistillationRun) -> bool:
    """The run's teacher server is a Deployment and Service of its own (``serving.placement: deployment``)."""
    return serves_teacher(run) and run.spec.teacher.serving.placement == "deployment"


def teacher_sidecar(run: DistillationRun) -> bool:
    """The run's teacher server is a sidecar container of each distill pod (``serving.placement: sidecar``)."""
    return serves_teacher(run) and run.spec.teacher.serving.placement == "sidecar"


def operator_stages(run: DistillationRun) -> list[str]:
    """The stages the operator walks and reports: ``planned_stages``, without the teacher when it is a
    sidecar (it then starts and stops with each distill pod, and the distill stage's status covers it)."""
    return [s for s in planned_stages(run) if s != "teacher" or deploys_teacher(run)]


def plumbing(obj: Manifest, run: DistillationRun) -> list[Manifest]:
    """What every run needs before its first stage, in creation order."""
    out = [service_account(obj), role(obj), role_binding(obj), config_map(obj, run)]
    if not run.spec.workspace.existing_claim:
        out.append(workspace_pvc(obj, run))
    if deploys_teacher(run) and run.spec.teacher.serving.network_policy:
        out.append(teacher_network_policy(obj, run))  # before the teacher: its pods are never open
    return out


def teacher_network_policy(obj: Manifest, run: DistillationRun) -> Manifest:
    """Ingress to the run's teacher pods: only from the run's distill pods (the learner, the one stage that
    calls the teacher), only on the serving port. A NetworkPolicy that selects pods denies them all other
    ingress; it takes effect only where the network plugin enforces NetworkPolicies."""
    run_name = obj["metadata"]["name"]
    distill = {names.RUN_LABEL: run_name, names.STAGE_LABEL: "distill"}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(obj, names.teacher(run_name), "teacher"),
        "spec": {
            "podSelector": {"matchLabels": {names.RUN_LABEL: run_name, names.STAGE_LABEL: "teacher"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": distill}}],
                    "ports": [{"protocol": "TCP", "port": run.spec.teacher.serving.port}],
                }
            ],
        },
    }


def teacher_key_env(run: DistillationRun, stage: str) -> list[Manifest]:
    """The teacher server's API key (spec.teacher.serving.apiKeySecret) as an environment variable read
    from the Secret, for the teacher pods (vLLM checks it) and the distill pods (the learner sends it)."""
    ref = run.spec.teacher.serving.api_key_secret
    if ref is None or stage not in ("teacher", "distill") or run.spec.teacher.backend != "vllm-server":
        return []
    return [{"name": TEACHER_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


# ---- pods -----------------------------------------------------------------------------------------------


def pod_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": names.RUN_AS_USER,
        "runAsGroup": names.RUN_AS_USER,
        "fsGroup": names.RUN_AS_USER,
        # chown the volumes only when their root's group is not already fsGroup, not the whole workspace
        # (checkpoints, models: minutes on a large volume) at every pod start
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(spec: ResourcesSpec, gpu_resource: str = DEFAULT_GPU_RESOURCE) -> Manifest:
    """Requests equal limits: cpu/memory as given, ``gpu_resource`` (the pod inputs' gpuResourceName) when
    the stage wants GPUs."""
    amounts: dict[str, str] = {}
    if spec.cpu:
        amounts["cpu"] = spec.cpu
    if spec.memory:
        amounts["memory"] = spec.memory
    if spec.gpus:
        amounts[gpu_resource] = str(spec.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod_inputs(run: DistillationRun, stage: str) -> PodSpecInputs:
    """The run's ``spec.pod`` with the stage's own ``pod`` merged on top (``PodSpecInputs.merged``)."""
    own = run.spec.teacher.serving.pod if stage == "teacher" else getattr(getattr(run.spec, stage), "pod", None)
    return run.spec.pod.merged(own)


def _shm(inputs: PodSpecInputs) -> Manifest:
    """/dev/shm: in memory, with the stage's size limit when one is given."""
    empty_dir: Manifest = {"medium": "Memory"}
    if inputs.shm_size:
        empty_dir["sizeLimit"] = inputs.shm_size
    return {"name": "dshm", "emptyDir": empty_dir}


def _volumes(obj: Manifest, run: DistillationRun, stage: str) -> list[Manifest]:
    claim = run.spec.workspace.existing_claim or names.workspace_claim(obj["metadata"]["name"])
    return [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "spec", "configMap": {"name": names.spec_configmap(obj["metadata"]["name"])}},
        _shm(pod_inputs(run, stage)),
    ]


_MOUNTS: list[Manifest] = [
    {"name": "workspace", "mountPath": names.WORKSPACE_MOUNT},
    {"name": "spec", "mountPath": names.CONFIG_DIR, "readOnly": True},
    {"name": "dshm", "mountPath": "/dev/shm"},
]


def _env(obj: Manifest, extra: dict[str, str], *, cache_root: str = names.WORKSPACE_MOUNT) -> list[Manifest]:
    env = {
        **extra,
        "OPD_RUN_NAME": obj["metadata"]["name"],
        "OPD_RUN_NAMESPACE": obj["metadata"]["namespace"],
        "OPD_TERMINATION_LOG": names.TERMINATION_LOG,
        "OPD_CACHE_DIR": f"{cache_root}/.cache/opd",
        "HF_HOME": f"{cache_root}/.cache/huggingface",
    }
    return [{"name": k, "value": v} for k, v in env.items()]


def _container(
    obj: Manifest,
    run: DistillationRun,
    stage: str,
    argv: tuple[str, ...],
    env: dict[str, str],
    res: ResourcesSpec,
    *,
    mounts: list[Manifest] = _MOUNTS,
    cache_root: str = names.WORKSPACE_MOUNT,
) -> Manifest:
    inputs = pod_inputs(run, stage)
    container: Manifest = {
        "name": stage,
        "image": run.spec.image,
        "imagePullPolicy": run.spec.image_pull_policy,
        "command": list(argv),
        # the user's variables first: the operator's (OPD_*, HF_HOME; the spec refuses those names) follow
        "env": [e.manifest() for e in inputs.env] + _env(obj, env, cache_root=cache_root) + teacher_key_env(run, stage),
        "resources": resources(res, inputs.gpu_resource_name or DEFAULT_GPU_RESOURCE),
        "volumeMounts": [dict(m) for m in mounts],
        "terminationMessagePath": names.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }
    if inputs.env_from:
        container["envFrom"] = [e.manifest() for e in inputs.env_from]
    return container


def _pod_spec(
    obj: Manifest,
    run: DistillationRun,
    container: Manifest,
    *,
    account: str | None,
    volumes: list[Manifest] | None = None,
) -> Manifest:
    stage = container["name"]
    inputs = pod_inputs(run, stage)
    spec: Manifest = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": _volumes(obj, run, stage) if volumes is None else volumes,
    }
    if account:
        spec["serviceAccountName"] = account
    else:
        spec["automountServiceAccountToken"] = False
    selector = {**run.spec.node_selector, **inputs.node_selector}
    if selector:
        spec["nodeSelector"] = selector
    tolerations = [*run.spec.tolerations, *inputs.tolerations]
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    if inputs.affinity is not None:
        spec["affinity"] = dict(inputs.affinity)
    if inputs.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in inputs.image_pull_secrets]
    if inputs.priority_class_name:
        spec["priorityClassName"] = inputs.priority_class_name
    if inputs.runtime_class_name:
        spec["runtimeClassName"] = inputs.runtime_class_name
    if inputs.scheduler_name:
        spec["schedulerName"] = inputs.scheduler_name
    return spec


def pod_metadata(run: DistillationRun, stage: str, labels: Manifest, annotations: Manifest | None = None) -> Manifest:
    """A pod template's metadata: the pod inputs' labels and annotations under the operator's own, which
    win (selectors, the spec digest and Kueue's queue label must stay the operator's)."""
    inputs = pod_inputs(run, stage)
    meta: Manifest = {"labels": {**inputs.labels, **labels}}
    merged = {**inputs.annotations, **(annotations or {})}
    if merged:
        meta["annotations"] = merged
    return meta


def nodes(run: DistillationRun, stage: str) -> int:
    """Pods the stage's Job runs: ``resources.nodes`` for the training stages, 1 otherwise."""
    return int(getattr(getattr(run.spec, stage).resources, "nodes", 1))


def stage_argv(obj: Manifest, run: DistillationRun, stage: str, attempt: int) -> tuple[str, ...]:
    """The stage container's command: ``stage_command``'s argv, for sft and distill behind the launcher
    that starts one process per GPU (``plan.launcher_argv``) and, on several pods, meets pod 0."""
    run_name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
    teacher_url = None
    if stage == "distill" and serves_teacher(run):
        port = run.spec.teacher.serving.port
        teacher_url = f"http://{LOOPBACK}:{port}" if teacher_sidecar(run) else names.teacher_url(run_name, ns, port)
    cmd = stage_command(run, stage, config=names.CONFIG_PATH, workspace=names.WORKSPACE_MOUNT, teacher_url=teacher_url)
    if stage not in TRAINING_STAGES:
        return cmd.argv  # eval uses its GPUs through vLLM tensor parallelism, in one process
    pods = nodes(run, stage)
    prefix = launcher_argv(
        processes_per_pod(getattr(run.spec, stage).resources.gpus),
        nodes=pods,
        master_addr=names.rank0_host(run_name, stage, attempt, ns) if pods > 1 else None,
    )
    return prefix + cmd.argv


def pod_failure_policy(stage: str, pods: int = 1) -> Manifest:
    """How the Job controller judges a failed pod before backoffLimit 0 applies. A pod disrupted by the
    cluster (preemption, a node drain or an eviction: condition DisruptionTarget) counts against nothing,
    neither the Job's backoffLimit nor the run's ``spec.retries``: a one-pod Job replaces it (Ignore) and the
    new pod resumes from the last checkpoint; a gang (``pods`` > 1) cannot take one new pod into its running
    torchrun world (see ``stage_job``), so the disruption fails its Job at once (FailJob), instead of leaving
    the other ranks to hang until their collective timeout, and the operator starts a new gang without
    counting a failure (``JobView.disrupted_failure``). Exit code 2 (bad configuration) fails the Job at
    once. restartPolicy Never, which a podFailurePolicy needs, is set."""
    return {
        "rules": [
            {
                "action": "Ignore" if pods == 1 else "FailJob",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": stage, "operator": "In", "values": [EXIT_BAD_CONFIG]},
            },
        ]
    }


def stage_job(obj: Manifest, run: DistillationRun, stage: str, attempt: int) -> Manifest:
    """The Job of one attempt of a batch stage (``sft``, ``distill``, ``eval``); Kubernetes never retries
    it (backoffLimit 0): the operator decides about retries.

    A training stage with ``resources.nodes`` N > 1 is an Indexed Job of N pods (hostnames ``<job>-<i>``
    under the subdomain of ``ranks_service``). backoffLimit 0 makes the gang all-or-nothing: the first
    failed pod fails the Job, the Job controller then deletes the other pods, and the operator's retry is
    a new Job of N pods resuming from the last checkpoint. A per-index retry (backoffLimitPerIndex) would
    bring back one pod into a torchrun world whose other members are stuck or gone: it cannot rejoin."""
    run_name = obj["metadata"]["name"]
    cmd = stage_command(run, stage, config=names.CONFIG_PATH, workspace=names.WORKSPACE_MOUNT)
    container = _container(
        obj, run, stage, stage_argv(obj, run, stage, attempt), cmd.env, getattr(run.spec, stage).resources
    )
    if stage == "distill" and run.spec.distill and run.spec.distill.metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": run.spec.distill.metrics_port}]
    pod_labels = {**names.labels(run_name, stage), names.ATTEMPT_LABEL: str(attempt)}
    pod_spec = _pod_spec(obj, run, container, account=names.stage_account(run_name))
    pod_spec["restartPolicy"] = "Never"
    if stage == "distill" and teacher_sidecar(run):
        # A restartable init container (a native sidecar): the kubelet starts the learner only once the
        # teacher's startup probe passes, restarts the teacher if it crashes, and stops it when the learner
        # ends. Its resources are part of the pod's, so Kueue admits teacher and learner as one workload.
        sidecar = _teacher_container(obj, run, sidecar=True)
        sidecar["restartPolicy"] = "Always"
        pod_spec["initContainers"] = [sidecar]
        have = {v["name"] for v in pod_spec["volumes"]}
        pod_spec["volumes"] += [v for v in _teacher_volumes(obj, run) if v["name"] not in have]
    meta = _meta(
        obj, names.job(run_name, stage, attempt), stage, annotations={names.SPEC_HASH_ANNOTATION: spec_hash(run)}
    )
    meta["labels"][names.ATTEMPT_LABEL] = str(attempt)
    pods = nodes(run, stage)
    spec: Manifest = {
        "backoffLimit": 0,
        "completions": pods,
        "parallelism": pods,
        "podFailurePolicy": pod_failure_policy(stage, pods),
    }
    if run.spec.queue_name:
        meta["labels"][names.KUEUE_QUEUE_LABEL] = run.spec.queue_name
        # Kueue's webhook would suspend it anyway; created suspended, it never starts a pod before admission
        # even where the webhook is down. The operator never writes spec.suspend afterwards (Kueue owns it).
        spec["suspend"] = True
    timeout = getattr(run.spec, stage).timeout_seconds
    if timeout:
        spec["activeDeadlineSeconds"] = timeout  # the Job controller fails the attempt (DeadlineExceeded)
    if pods > 1:
        spec["completionMode"] = "Indexed"
        pod_spec["subdomain"] = names.ranks_service(run_name, stage)
    spec["template"] = {"metadata": pod_metadata(run, stage, pod_labels), "spec": pod_spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def ranks_service(obj: Manifest, stage: str) -> Manifest:
    """The headless Service of a multi-node stage: it gives each pod of its Jobs a DNS name
    (``<job>-<index>.<service>``), so pod 0 can be the rendezvous host. Addresses are published before
    the pods are ready: the ranks meet while they start, long before any readiness."""
    run_name = obj["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(obj, names.ranks_service(run_name, stage), stage),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {names.RUN_LABEL: run_name, names.STAGE_LABEL: stage},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


# ---- the teacher server: no workspace ------------------------------------------------------------------
# Teacher pods mount a model cache of their own instead of the run's workspace, which is ReadWriteOnce by
# default: replicas and the learner can then sit on different nodes. The teacher needs from its
# `--workspace` only a place to resolve its model (hub download into HF_HOME, a `tiny://` build, a
# relative path); the run file comes from the spec ConfigMap, as for every stage.
_TEACHER_MOUNTS: list[Manifest] = [
    {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT},
    {"name": "spec", "mountPath": names.CONFIG_DIR, "readOnly": True},
    {"name": "dshm", "mountPath": "/dev/shm"},
]


def _teacher_volumes(obj: Manifest, run: DistillationRun) -> list[Manifest]:
    cache = run.spec.teacher.serving.model_cache
    model_cache: Manifest
    if cache.existing_claim:
        model_cache = {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.existing_claim}}
    else:
        model_cache = {"name": "model-cache", "emptyDir": {"sizeLimit": cache.size_limit} if cache.size_limit else {}}
    return [
        model_cache,
        {"name": "spec", "configMap": {"name": names.spec_configmap(obj["metadata"]["name"])}},
        _shm(pod_inputs(run, "teacher")),
    ]


def cluster_problems(run: DistillationRun) -> list[str]:
    """What the spec models accept but a cluster cannot run: a served teacher model that lives where
    teacher pods cannot read it, a stage whose predicted memory exceeds its GPU (``memory_plan``: models of
    a known family; a path the operator cannot read is not predicted), new tokens beyond a known model's
    positions (``positions``: eval would fail only after SFT and OPD). Each message names the field and the
    fix (the run fails as InvalidSpec)."""
    return _teacher_model_problems(run) + memory_problems(run, planned_stages(run)) + context_problems(run)


def _teacher_model_problems(run: DistillationRun) -> list[str]:
    if not serves_teacher(run):
        return []
    model, cache = run.spec.teacher.model, run.spec.teacher.serving.model_cache
    where = names.WORKSPACE_MOUNT
    if deploys_teacher(run) and (model == where or model.startswith(where + "/")):  # a sidecar mounts it
        return [
            f"spec.teacher.model: {model} is on the run's workspace, which teacher pods do not mount (it is "
            "ReadWriteOnce by default and held by the stage pods); put the model on a claim named in "
            "spec.teacher.serving.modelCache.existingClaim and give its path relative to it (./NAME), or "
            "use a hub id"
        ]
    if model.startswith(("./", "../")) and not cache.existing_claim:
        return [
            f"spec.teacher.model: {model} resolves against the teacher's model cache ({MODEL_CACHE_MOUNT}), "
            "an empty emptyDir without spec.teacher.serving.modelCache.existingClaim; name a pre-filled claim "
            "there, or use a hub id (or an absolute path inside the image)"
        ]
    return []


def teacher_queue(run: DistillationRun) -> str | None:
    """The Kueue LocalQueue of the teacher: its own ``queueName``, else the run's."""
    return run.spec.teacher.serving.queue_name or run.spec.queue_name


def _teacher_container(obj: Manifest, run: DistillationRun, *, sidecar: bool) -> Manifest:
    """The vLLM teacher server's container: in its own Deployment, or as a sidecar of a distill pod, bound to
    the pod's loopback so that nothing outside the pod reaches it."""
    serving = run.spec.teacher.serving
    cmd = stage_command(
        run,
        "teacher",
        config=names.CONFIG_PATH,
        workspace=MODEL_CACHE_MOUNT,
        port=serving.port,
        host=LOOPBACK if sidecar else "0.0.0.0",
    )
    container = _container(
        obj,
        run,
        "teacher",
        cmd.argv,
        cmd.env,
        teacher_resources(run),
        mounts=_TEACHER_MOUNTS,
        cache_root=MODEL_CACHE_MOUNT,
    )
    probe: Manifest
    if sidecar:
        # the kubelet's HTTP probes come from outside the pod and cannot reach loopback: the probe runs inside
        health = f"http://{LOOPBACK}:{serving.port}/health"
        code = f"import urllib.request; urllib.request.urlopen({health!r}, timeout={PROBE_TIMEOUT_S})"
        probe = {"exec": {"command": ["python3", "-c", code]}, "periodSeconds": PROBE_PERIOD_S}
        probe["timeoutSeconds"] = PROBE_TIMEOUT_S + 5  # the interpreter's start on top of the request
    else:
        container["ports"] = [{"name": "http", "containerPort": serving.port}]
        probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": PROBE_PERIOD_S}
    # Loading a large model takes minutes: the startup budget is the whole readyTimeoutSeconds (rounded up
    # to a period), so the kubelet never restarts a teacher the operator still waits for; then quick
    # readiness checks.
    startup_failures = max(1, math.ceil(serving.ready_timeout_seconds / PROBE_PERIOD_S))
    container["startupProbe"] = {**probe, "failureThreshold": startup_failures}
    container["readinessProbe"] = {**probe, "failureThreshold": 3}
    return container


def teacher_deployment(obj: Manifest, run: DistillationRun) -> Manifest:
    run_name = obj["metadata"]["name"]
    serving = run.spec.teacher.serving
    container = _teacher_container(obj, run, sidecar=False)
    pod_labels = names.labels(run_name, "teacher")
    digest = spec_hash(run)
    meta = _meta(obj, names.teacher(run_name), "teacher", annotations={names.SPEC_HASH_ANNOTATION: digest})
    queue = teacher_queue(run)
    if queue:
        # Kueue's Deployment integration reads the Deployment's label and copies it to the pod template; the
        # template carries it too, so Kueue's pod integration alone gates the pods as well.
        meta["labels"][names.KUEUE_QUEUE_LABEL] = queue
        pod_labels[names.KUEUE_QUEUE_LABEL] = queue
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": serving.replicas,
            # the Deployment controller marks a rollout that is not Available by then ProgressDeadlineExceeded;
            # the operator fails the teacher attempt on it (or on its own clock, whichever comes first)
            "progressDeadlineSeconds": serving.ready_timeout_seconds,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {names.RUN_LABEL: run_name, names.STAGE_LABEL: "teacher"}},
            "template": {
                # the run file the pods read: a changed spec means other pods (see reconcile: the teacher
                # follows the accepted spec)
                "metadata": pod_metadata(run, "teacher", pod_labels, {names.SPEC_HASH_ANNOTATION: digest}),
                "spec": _pod_spec(obj, run, container, account=None, volumes=_teacher_volumes(obj, run)),
            },
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
