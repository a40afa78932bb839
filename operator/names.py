"""Names and labels of a run's children: deterministic, so re-creating one is idempotent (409 = there)."""

from __future__ import annotations

from typing import Any

from opd_runtime.contract import API_VERSION, KIND

APP = "opd"
MANAGER = "opd-operator"
# kopf's finalizer on every run the operator acts on: deleting a run waits for the operator to let it go
# (docs/operator/shared-cluster.md says how an admin removes it when the operator is gone).
FINALIZER = "opd.dev/operator"
RUN_LABEL = "opd.dev/run"
STAGE_LABEL = "opd.dev/stage"
ATTEMPT_LABEL = "opd.dev/attempt"
SPEC_HASH_ANNOTATION = "opd.dev/spec-hash"
# Kueue: the LocalQueue that admits a Job or a Deployment's pods; the scheduling gate it holds pods with.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"

WORKSPACE_MOUNT = "/workspace"
CONFIG_DIR = "/etc/opd"
CONFIG_FILE = "run.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
TERMINATION_LOG = "/dev/termination-log"
# The runtime images' non-root user (images/runtime-*/Dockerfile).
RUN_AS_USER = 10001


def workspace_claim(run: str) -> str:
    return f"{run}-workspace"


def spec_configmap(run: str) -> str:
    return f"{run}-spec"


def stage_account(run: str) -> str:
    return f"{run}-stage"


def teacher(run: str) -> str:
    return f"{run}-teacher"


def job(run: str, stage: str, attempt: int) -> str:
    return f"{run}-{stage}-{attempt}"


def ranks_service(run: str, stage: str) -> str:
    """The headless Service of a multi-node stage; its pods' hostnames resolve under it."""
    return f"{run}-{stage}-ranks"


def rank0_host(run: str, stage: str, attempt: int, namespace: str) -> str:
    """DNS name of pod 0 of an attempt's Indexed Job (hostname ``<job>-0``, subdomain the ranks Service)."""
    return f"{job(run, stage, attempt)}-0.{ranks_service(run, stage)}.{namespace}.svc"


def teacher_url(run: str, namespace: str, port: int) -> str:
    return f"http://{teacher(run)}.{namespace}.svc:{port}"


def labels(run: str, stage: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/managed-by": MANAGER,
        "app.kubernetes.io/instance": run,
        RUN_LABEL: run,
    }
    if stage is not None:
        out[STAGE_LABEL] = stage
    return out


def selector(run: str) -> str:
    return f"{RUN_LABEL}={run},app.kubernetes.io/managed-by={MANAGER}"


def owner_reference(run: dict[str, Any]) -> dict[str, Any]:
    meta = run["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
