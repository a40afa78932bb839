"""The invalid-spec corpus: cross-field mistakes that `opd validate` refuses, each with the field it names.

Each case is examples/tiny-math.yaml with one edit. tests/k8s/test_admission_k8s.py holds both sides to it:
the spec models refuse each one naming ``field``, and so does the API server at ``kubectl apply`` (the
CRD's CEL rules, operator/crd.py and the models' ``x-kubernetes-validations``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
Manifest = dict[str, Any]
SECRET_REF = {"secretKeyRef": {"name": "s", "key": "k"}}


@dataclass(frozen=True)
class Case:
    id: str
    edit: dict[str, Any]  # merged into spec (dicts merged, other values replaced)
    field: str  # the path both refusals name, dotted (spec.pod.env.0)


CASES = [
    Case("multi-node-on-rwo-workspace", {"sft": {"resources": {"nodes": 2}}}, "spec"),
    Case(
        "teacher-replicas-on-rwo-model-cache",
        {"teacher": {"serving": {"replicas": 2, "modelCache": {"existingClaim": "models"}}}},
        "spec.teacher.serving",
    ),
    Case("reserved-env-name", {"pod": {"env": [{"name": "OPD_RUN_NAME", "value": "x"}]}}, "spec.pod.env.0"),
    Case(
        "env-value-and-value-from",
        {"sft": {"pod": {"env": [{"name": "A", "value": "x", "valueFrom": SECRET_REF}]}}},
        "spec.sft.pod.env.0",
    ),
    Case(
        "env-two-key-refs",
        {"pod": {"env": [{"name": "A", "valueFrom": {**SECRET_REF, "configMapKeyRef": {"name": "c", "key": "k"}}}]}},
        "spec.pod.env.0.valueFrom",
    ),
    Case(
        "env-from-two-sources",
        {"pod": {"envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]}},
        "spec.pod.envFrom.0",
    ),
    Case("ratio-cap-with-another-loss", {"distill": {"loss": "ppo", "importanceRatioCap": 2.0}}, "spec.distill"),
    Case("rl-with-a-teacher-loss", {"distill": {"objective": "rl", "loss": "full_reverse_kl"}}, "spec.distill"),
    Case(
        "rl-with-one-sample",
        {"distill": {"objective": "rl", "samplesPerPrompt": 1, "microBatchSize": 32}},
        "spec.distill",
    ),
    Case("fsdp-with-lora", {"sft": {"strategy": "fsdp", "lora": {"enabled": True}}}, "spec.sft"),
    Case("fsdp-with-vllm-sampler", {"distill": {"strategy": "fsdp", "sampler": {"backend": "vllm"}}}, "spec.distill"),
    Case(
        "sidecar-teacher-with-replicas",
        {"teacher": {"serving": {"placement": "sidecar", "replicas": 2}}},
        "spec.teacher.serving",
    ),
    Case(
        "sidecar-teacher-on-the-metrics-port",
        {"teacher": {"serving": {"placement": "sidecar", "port": 9400}}, "distill": {"metricsPort": 9400}},
        "spec",
    ),
]


def _merge(target: Manifest, edit: Manifest) -> None:
    for key, value in edit.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def invalid_run(case: Case, name: str = "bad") -> Manifest:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-math.yaml").read_text())
    doc["metadata"] = {"name": name}
    _merge(doc["spec"], case.edit)
    return doc
