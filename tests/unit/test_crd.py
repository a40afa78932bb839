"""The CRD is generated from the spec models: current, structural, documented (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import yaml

from opd_operator import crd
from opd_operator.rbac import OPERATOR_RULES, stage_rules

ROOT = Path(__file__).resolve().parents[2]


def walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_the_committed_crd_is_current():
    committed = (ROOT / "crds" / "distillationruns.opd.dev.yaml").read_text()
    assert committed == crd.render(), "crds/ is stale: run `make crds`"


def test_schema_is_structural_and_every_spec_field_is_documented():
    root = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(root):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "nullable"} & node.keys(), path
        if path:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if path.startswith(".spec.") or path.startswith(".status."):
            assert node.get("description") or path.endswith("[]") or path.endswith("{}"), f"{path} has no description"
    spec = root["properties"]["spec"]
    assert spec["properties"]["distill"]["properties"]["steps"]["minimum"] == 1
    assert spec["properties"]["distill"]["properties"]["loss"]["enum"][0] == "importance_sampling"
    assert spec["properties"]["tolerations"]["items"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["properties"]["sft"]["properties"]["optimizer"]["default"]["schedule"] == "cosine"


def test_names_columns_and_status_subresource():
    doc = yaml.safe_load(crd.render())
    assert doc["metadata"]["name"] == "distillationruns.opd.dev"
    assert doc["spec"]["names"]["shortNames"] == ["dr"] and "opd" in doc["spec"]["names"]["categories"]
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:6] == [
        "Phase",
        "Stage",
        "Step",
        "ReverseKL",
        "Score",
        "Age",
    ]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert "progress" in status["properties"]


def test_rbac_rules_are_data():
    verbs = {
        (g, r): set(rule["verbs"]) for rule in OPERATOR_RULES for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert verbs[("opd.dev", "distillationruns/status")] == {"patch"}  # no get: nothing reads it separately
    assert ("", "secrets") not in verbs and not any("update" in v and g == "" for (g, _), v in verbs.items())
    # each verb's reason and the proof that the code uses it: tests/unit/test_rbac.py, tests/k8s/test_rbac_k8s.py
    assert stage_rules("r")[0]["resourceNames"] == ["r"]
