"""Teacher pods read their model from a model cache of their own, never the run's ReadWriteOnce workspace.

The pure tests check the manifests and the refusals; the ``k8s`` tests run the operator (a subprocess with
its own RBAC, as in test_operator_k8s.py) against the real control plane, where kwok runs the pods.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from opd_operator import children
from opd_operator.observe import observe
from opd_operator.reconcile import decide
from opd_runtime.spec import SpecError, parse_run

from support.controlplane import ControlPlane, ControlPlaneError
from support.opd_fake_cluster import tiny_run
from support.operator_harness import TIMEOUT, Operator, Run, exists, tiny_math

T0 = datetime(2026, 12, 2, 3, 0, 0, tzinfo=UTC)


def pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def claims(spec: dict) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def with_cache(obj: dict, **cache: Any) -> dict:
    obj["spec"]["teacher"]["serving"]["modelCache"] = cache
    return obj


# ---- the manifests (pure) ------------------------------------------------------------------------------


def test_teacher_pods_mount_an_emptydir_model_cache_and_not_the_workspace():
    obj = with_cache(tiny_run(), sizeLimit="20Gi")
    run = parse_run(obj)
    spec = pod_spec(children.teacher_deployment(obj, run))
    (container,) = spec["containers"]
    assert claims(spec) == set()  # no PersistentVolumeClaim at all, the workspace's included
    cache = next(v for v in spec["volumes"] if v["name"] == "model-cache")
    assert cache == {"name": "model-cache", "emptyDir": {"sizeLimit": "20Gi"}}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/model-cache", "/etc/opd", "/dev/shm"}
    # tiny:// builds, hub downloads and relative model paths all land in the cache
    assert container["command"][container["command"].index("--workspace") + 1] == "/model-cache"
    env = env_of(container)
    assert env["HF_HOME"].startswith("/model-cache/") and env["OPD_CACHE_DIR"].startswith("/model-cache/")
    # the batch stages keep the workspace
    for stage in ("sft", "distill", "eval"):
        assert claims(pod_spec(children.stage_job(obj, run, stage, 1))) == {"tiny-workspace"}, stage


def test_a_named_model_cache_claim_is_mounted_instead():
    obj = with_cache(tiny_run(), existingClaim="models", accessModes=["ReadWriteMany"])
    obj["spec"]["teacher"]["serving"]["replicas"] = 3
    spec = pod_spec(children.teacher_deployment(obj, parse_run(obj)))
    assert claims(spec) == {"models"}
    assert not any("emptyDir" in v for v in spec["volumes"] if v["name"] == "model-cache")


@pytest.mark.parametrize("modes", [["ReadWriteOnce"], ["ReadWriteOncePod"], ["ReadWriteOnce", "ReadWriteOncePod"]])
def test_replicas_sharing_a_single_node_model_cache_are_refused_naming_the_fields(modes: list[str]):
    obj = with_cache(tiny_run(), existingClaim="models", accessModes=modes)
    obj["spec"]["teacher"]["serving"]["replicas"] = 2
    with pytest.raises(SpecError) as err:
        parse_run(obj)
    text = str(err.value)
    assert "spec.teacher.serving" in text and "replicas 2" in text and "modelCache.existingClaim 'models'" in text
    assert "modelCache.accessModes: [ReadWriteMany]" in text and "`replicas: 1`" in text  # the fixes
    obj["spec"]["teacher"]["serving"]["replicas"] = 1
    parse_run(obj)  # one replica: one node
    del obj["spec"]["teacher"]["serving"]["modelCache"]["existingClaim"]
    obj["spec"]["teacher"]["serving"]["replicas"] = 2
    parse_run(obj)  # emptyDirs: one per pod


def test_the_default_access_mode_of_a_named_claim_is_the_safe_single_node_one():
    obj = with_cache(tiny_run(), existingClaim="models")
    obj["spec"]["teacher"]["serving"]["replicas"] = 2
    with pytest.raises(SpecError, match="ReadWriteOnce"):
        parse_run(obj)


@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_a_multi_node_stage_on_a_single_node_workspace_is_refused_naming_the_fields(stage: str):
    obj = tiny_run()
    obj["spec"][stage]["resources"] = {"gpus": 4, "nodes": 2}
    for modes in (None, ["ReadWriteOnce"], ["ReadWriteOncePod"]):
        if modes:
            obj["spec"]["workspace"]["accessModes"] = modes
        with pytest.raises(SpecError) as err:
            parse_run(obj)
        text = str(err.value)
        assert f"{stage}.resources.nodes 2" in text and "workspace.accessModes" in text, text
        assert "`workspace.accessModes: [ReadWriteMany]`" in text and f"`{stage}.resources.nodes: 1`" in text
    obj["spec"]["workspace"]["accessModes"] = ["ReadWriteMany"]
    parse_run(obj)
    obj["spec"]["workspace"]["accessModes"] = ["ReadWriteOnce"]
    obj["spec"][stage]["enabled"] = False  # a stage that does not run places no pods
    obj["spec"]["eval"]["targets"] = ["student"]
    parse_run(obj)


@pytest.mark.parametrize(
    ("model", "cache", "problem"),
    [
        ("/workspace/models/teacher", {"existingClaim": "models"}, "on the run's workspace"),
        ("/workspace", {}, "on the run's workspace"),
        ("./teacher", {}, "an empty emptyDir"),
        ("./teacher", {"existingClaim": "models"}, None),
        ("Qwen/Qwen3-8B", {}, None),
        ("tiny://teacher", {}, None),
        ("/models/baked-into-the-image", {}, None),
    ],
)
def test_a_served_teacher_model_the_pods_cannot_read_fails_the_run_as_invalid(model, cache, problem):
    obj = with_cache(tiny_run(), **cache)
    obj["spec"]["teacher"]["model"] = model
    # where teacher pods can read the model (the memory plan's own refusals are tested in test_memory_plan)
    found = [p for p in children.cluster_problems(parse_run(obj)) if p.startswith("spec.teacher.model")]
    if problem is None:
        assert found == []
        return
    assert len(found) == 1 and found[0].startswith(f"spec.teacher.model: {model} ") and problem in found[0]
    assert "spec.teacher.serving.modelCache.existingClaim" in found[0]  # the fix names the field
    d = decide(obj, observe("tiny", {}), T0)
    assert d.actions == [] and d.status["phase"] == "Failed"
    failed = next(c for c in d.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.teacher.model" in failed["message"]
    # scored in-process (backend local), the learner reads the model from the workspace: allowed
    obj["spec"]["teacher"]["backend"] = "local"
    assert [p for p in children.cluster_problems(parse_run(obj)) if p.startswith("spec.teacher.model")] == []


# ---- on the real control plane ---------------------------------------------------------------------------


def distill_only(name: str, **serving: Any) -> dict:
    """tiny-math without SFT, so the teacher is the first thing the operator starts."""
    doc = tiny_math(name)
    doc["spec"]["sft"]["enabled"] = False
    doc["spec"]["eval"]["targets"] = ["student", "distill"]
    doc["spec"]["teacher"]["serving"].update(serving)
    return doc


def teacher_pods(cp: ControlPlane, ns: str, run: str, count: int) -> list[dict]:
    def running() -> list[dict] | None:
        pods = cp.pods(ns, f"opd.dev/run={run},opd.dev/stage=teacher")
        ok = [p for p in pods if p["status"].get("phase") == "Running"]
        return ok if len(ok) == count else None

    return cp.wait(f"{count} running teacher pod(s) of {run}", running, timeout=TIMEOUT)


def test_teacher_pods_run_without_the_workspace_beside_the_learner(cp: ControlPlane, ns: str, operator: Operator):
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "standard",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
        namespace=ns,
    )
    plain = Run(cp, ns, distill_only("plain", modelCache={"sizeLimit": "5Gi"}))
    shared = Run(
        cp,
        ns,
        distill_only("shared", replicas=2, modelCache={"existingClaim": "models", "accessModes": ["ReadWriteMany"]}),
    )
    for run, replicas, cache_claims in ((plain, 1, set()), (shared, 2, {"models"})):
        run.wait("distill running", lambda st: (st.get("stages", {}).get("distill") or {}).get("phase") == "Running")
        for pod in teacher_pods(cp, ns, run.name, replicas):
            assert claims(pod["spec"]) == cache_claims, pod["metadata"]["name"]  # never f"{run}-workspace"
            mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
            assert "/workspace" not in mounts and "/model-cache" in mounts
        learner = run.running_pod(f"{run.name}-distill-1")
        assert claims(learner["spec"]) == {f"{run.name}-workspace"}  # the learner holds the workspace


def test_a_spec_that_needs_one_rwo_volume_on_several_nodes_is_refused(cp: ControlPlane, ns: str, operator: Operator):
    # Rules across fields that the CRD states in CEL are refused at `kubectl apply`, naming the field ...
    rwo = distill_only("rwo", replicas=2, modelCache={"existingClaim": "models"})
    two_nodes = tiny_math("two-nodes")
    two_nodes["spec"]["distill"]["resources"] = {"gpus": 4, "nodes": 2}  # on the default ReadWriteOnce workspace
    for doc, field in ((rwo, "modelCache.existingClaim"), (two_nodes, "workspace.accessModes")):
        with pytest.raises(ControlPlaneError) as refused:
            cp.apply(doc, ns)
        assert "is invalid" in str(refused.value) and field in str(refused.value)
        assert not exists(cp, f"/apis/opd.dev/v1alpha1/namespaces/{ns}/distillationruns/{doc['metadata']['name']}")
    # ... and one that needs the cluster's view (where teacher pods can read the model) by the operator
    on_workspace = distill_only("on-ws")
    on_workspace["spec"]["teacher"]["model"] = "/workspace/models/teacher"
    run = Run(cp, ns, on_workspace)
    st = run.wait("Failed", lambda st: st.get("phase") == "Failed")
    failed = run.condition("Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec", failed
    assert "spec.teacher.model" in failed["message"] and "spec.teacher.model" in st["message"]
    assert "InvalidSpec" in run.events()
    assert not exists(cp, f"/apis/apps/v1/namespaces/{ns}/deployments/{run.name}-teacher")
    assert run.jobs() == []
