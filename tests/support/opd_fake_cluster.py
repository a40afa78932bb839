"""An in-memory stand-in for the API server, for fast tests of the operator's decisions and driver.

It plays only what the reconcile loop relies on: objects by kind and name, label-selector lists, 409 on
duplicate creates, Jobs that get a pod, pods that a test finishes (``finish_job``), Deployments a test
makes Available. The real behaviour is proven against a real control plane in test_operator_k8s.py.
"""

from __future__ import annotations

import copy
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
Manifest = dict[str, Any]


def tiny_run(name: str = "tiny", namespace: str = "ns", **spec: Any) -> Manifest:
    """examples/tiny-math.yaml as a run object in ``namespace``; ``spec`` overrides top-level spec keys."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-math.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1}
    doc["spec"].update(spec)
    return doc


def _matches(obj: Manifest, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _fields_match(obj: Manifest, fields: str) -> bool:
    """A field selector of ``a.b=value`` terms (what the operator sends: involvedObject.uid of Events)."""
    for term in filter(None, fields.split(",")):
        key, value = term.split("=", 1)
        found: Any = obj
        for part in key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if found != value:
            return False
    return True


class FakeApi:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Manifest] = {}
        self.calls: list[tuple[str, str, str]] = []
        self._ids = itertools.count(1)
        self.refuse: dict[str, str] = {}  # kind -> message of a 422 for every create of that kind

    # ---- the Api protocol -----------------------------------------------------------------------
    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, kind: str, namespace: str, selector: str, fields: str = "") -> list[Manifest]:
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in self.objects.items()
            if k == kind and ns == namespace and _matches(o, selector) and _fields_match(o, fields)
        ]

    def create(self, namespace: str, body: Manifest) -> bool:
        kind, name = body["kind"], body["metadata"]["name"]
        self.calls.append(("create", kind, name))
        if kind in self.refuse:
            from opd_operator.kube import ApiError

            raise ApiError(422, self.refuse[kind])
        if (kind, namespace, name) in self.objects:
            return False
        obj = copy.deepcopy(body)
        obj["metadata"].setdefault("uid", f"uid-{next(self._ids)}")
        obj["metadata"]["generation"] = 1
        self.objects[(kind, namespace, name)] = obj
        if kind == "Job" and not obj["spec"].get("suspend"):
            self._pod_for(namespace, obj)
        return True

    def patch(self, kind: str, namespace: str, name: str, patch: Manifest, *, subresource: str = "") -> None:
        self.calls.append(("patch", kind, name))
        obj = self.objects[(kind, namespace, name)]
        _merge(obj, json.loads(json.dumps(patch)))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("delete", kind, name))
        self.objects.pop((kind, namespace, name), None)
        if kind == "Job":  # background propagation, played at once
            for key in [
                k
                for k, o in self.objects.items()
                if k[0] == "Pod" and (o["metadata"]["labels"] or {}).get("job-name") == name
            ]:
                del self.objects[key]

    # ---- playing the cluster's part -------------------------------------------------------------
    def _pod_for(self, namespace: str, job: Manifest) -> None:
        labels = {**job["spec"]["template"]["metadata"]["labels"], "job-name": job["metadata"]["name"]}
        name = f"{job['metadata']['name']}-pod"
        self.objects[("Pod", namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": copy.deepcopy(job["spec"]["template"]["spec"]),
            "status": {"phase": "Running"},
        }

    def set_suspend(self, name: str, suspend: bool, namespace: str = "ns") -> None:
        """What Kueue does to a Job it manages: unsuspend it on admission (the Job controller then makes its
        pod), suspend it again on preemption (the Job controller deletes the pod; the Job does not fail)."""
        job = self.objects[("Job", namespace, name)]
        job["spec"]["suspend"] = suspend
        pods = [k for k, o in self.objects.items() if k[0] == "Pod" and o["metadata"]["labels"].get("job-name") == name]
        if suspend:
            for key in pods:
                del self.objects[key]
        elif not pods:
            self._pod_for(namespace, job)

    def add_run(self, run: Manifest) -> Manifest:
        self.objects[("DistillationRun", run["metadata"]["namespace"], run["metadata"]["name"])] = copy.deepcopy(run)
        return run

    def run(self, namespace: str = "ns", name: str = "tiny") -> Manifest:
        return self.objects[("DistillationRun", namespace, name)]

    def edit_spec(self, namespace: str = "ns", name: str = "tiny", **changes: Any) -> None:
        run = self.run(namespace, name)
        _merge(run["spec"], changes)
        run["metadata"]["generation"] += 1

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for (k, _, _), o in self.objects.items() if k == kind]

    def names(self, kind: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.of_kind(kind))

    def finish_job(self, name: str, code: int, message: Any = "", namespace: str = "ns") -> None:
        """The Job's pod exits with ``code`` and termination message ``message`` (a dict is JSON)."""
        text = json.dumps(message) if isinstance(message, dict) else message
        for pod in self.of_kind("Pod"):
            if pod["metadata"]["labels"].get("job-name") == name:
                pod["status"] = {
                    "phase": "Succeeded" if code == 0 else "Failed",
                    "containerStatuses": [
                        {
                            "name": "main",
                            "state": {
                                "terminated": {
                                    "exitCode": code,
                                    "message": text,
                                    "finishedAt": "2026-11-25T12:00:00Z",
                                    "reason": "Completed" if code == 0 else "Error",
                                }
                            },
                        }
                    ],
                }
        job = self.objects[("Job", namespace, name)]
        job["status"] = {"conditions": [{"type": "Complete" if code == 0 else "Failed", "status": "True"}]}

    def make_available(self, name: str, namespace: str = "ns") -> None:
        dep = self.objects[("Deployment", namespace, name)]
        dep["status"] = {
            "observedGeneration": 1,
            "availableReplicas": 1,
            "readyReplicas": 1,
            "conditions": [{"type": "Available", "status": "True"}],
        }


def _merge(target: Manifest, patch: Manifest) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def cond(status: Manifest, type_: str) -> Manifest:
    return next(c for c in status["conditions"] if c["type"] == type_)


class Story:
    """One run in a FakeApi, reconciled at a controllable clock."""

    def __init__(self, **spec: Any):
        self.api = FakeApi()
        self.api.add_run(tiny_run(**spec))
        self.now = T0

    def reconcile(self, seconds: float = 1.0):
        from opd_operator import driver

        self.now += timedelta(seconds=seconds)
        return driver.reconcile_once(self.api, "ns", "tiny", now=self.now)

    @property
    def status(self) -> Manifest:
        return self.api.run()["status"]

    def jobs(self) -> list[str]:
        return self.api.names("Job")

    def to_distill(self) -> None:
        """sft finished and the teacher available: the distill Job is created."""
        self.reconcile()
        self.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400, "checkpoint": "/workspace/sft/final"})
        self.reconcile()
        self.api.make_available("tiny-teacher")
        self.reconcile()
