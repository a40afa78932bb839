"""``python -m opd_operator render``: the objects the operator would create for a run, without a cluster.

Checked against the operator's own behaviour: the driver reconciling the run in the fake cluster (every
Job finishing with exit 0, the teacher made Available) creates exactly the rendered objects, in the same
order; and the real API server accepts them (server-side dry run).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from opd_operator import driver
from opd_operator.render import PLACEHOLDER_UID, render
from opd_runtime.plan import serves_teacher
from opd_runtime.spec import parse_run

from support.controlplane import ControlPlane
from support.opd_fake_cluster import FakeApi

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
T0 = datetime(2026, 12, 2, 3, 0, 0, tzinfo=UTC)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


class RecordingApi(FakeApi):
    """The fake cluster, remembering each object the operator created, as sent (Events aside: they
    report on the run, they are not its children)."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[dict] = []

    def create(self, namespace: str, body: dict) -> bool:
        sent = copy.deepcopy(body)
        made = super().create(namespace, body)
        if made and body["kind"] != "Event":
            self.created.append(sent)
        return made


def operator_creates(doc: dict, namespace: str) -> list[dict]:
    """Reconcile ``doc`` in the fake cluster, every stage succeeding, until the run Succeeded."""
    api = RecordingApi()
    obj = copy.deepcopy(doc)
    obj["metadata"].update(namespace=namespace, uid=PLACEHOLDER_UID, generation=1)
    name = obj["metadata"]["name"]
    api.add_run(obj)
    for i in range(64):
        driver.reconcile_once(api, namespace, name, now=T0 + timedelta(seconds=i))
        if (api.run(namespace, name).get("status") or {}).get("phase") == "Succeeded":
            return api.created
        for job in api.of_kind("Job"):
            if not job.get("status"):
                api.finish_job(job["metadata"]["name"], 0, {"stage": "x"}, namespace=namespace)
        for dep in api.of_kind("Deployment"):
            if not dep.get("status"):
                api.make_available(dep["metadata"]["name"], namespace=namespace)
    raise AssertionError(f"the run did not succeed: {api.run(namespace, name).get('status')}")


def render_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opd_operator", "render", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_render_prints_exactly_what_the_reconciler_creates_for_every_stage(example: Path):
    doc = load(example)
    rendered = render(doc, "team-a")
    assert rendered == operator_creates(doc, "team-a")
    name = doc["metadata"]["name"]
    assert [(o["kind"], o["metadata"]["name"]) for o in rendered] == [
        ("ServiceAccount", f"{name}-stage"),
        ("Role", f"{name}-stage"),
        ("RoleBinding", f"{name}-stage"),
        ("ConfigMap", f"{name}-spec"),
        ("PersistentVolumeClaim", f"{name}-workspace"),
        *([("NetworkPolicy", f"{name}-teacher")] if serves_teacher(parse_run(doc)) else []),  # before the teacher
        ("Job", f"{name}-sft-1"),
        *(  # objective rl (examples/tiny-math-rl.yaml) serves no teacher
            [("Deployment", f"{name}-teacher"), ("Service", f"{name}-teacher")]
            if serves_teacher(parse_run(doc))
            else []
        ),
        ("Job", f"{name}-distill-1"),
        ("Job", f"{name}-eval-1"),
    ]
    assert {o["metadata"]["namespace"] for o in rendered} == {"team-a"}


def test_the_command_prints_the_objects_as_yaml_in_the_files_or_the_given_namespace():
    proc = render_cli("examples/tiny-math.yaml", "--namespace", "demo")
    assert proc.returncode == 0, proc.stderr
    assert PLACEHOLDER_UID in proc.stdout.splitlines()[0]  # says the uid is a placeholder
    printed = list(yaml.safe_load_all(proc.stdout))
    assert printed == render(load(ROOT / "examples" / "tiny-math.yaml"), "demo")
    config = next(o for o in printed if o["kind"] == "ConfigMap")
    assert "\n  run.yaml: |\n" in proc.stdout and yaml.safe_load(config["data"]["run.yaml"])["spec"]
    doc: dict[str, Any] = load(ROOT / "examples" / "tiny-math.yaml")
    doc["metadata"].update(namespace="from-file", uid="1234")
    assert {o["metadata"]["namespace"] for o in render(doc)} == {"from-file"}
    owners = [r["uid"] for o in render(doc) for r in o["metadata"].get("ownerReferences", [])]
    assert len(owners) == 10 and set(owners) == {"1234"}  # all but the workspace claim (retentionPolicy Retain)
    doc["spec"]["suspend"] = True  # rendered as it runs once resumed
    assert render(doc) == render({**doc, "spec": {**doc["spec"], "suspend": False}})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["spec"]["distill"].update(steps=-1), "spec.distill.steps"),
        (lambda d: d["spec"]["teacher"].update(model="/workspace/teacher"), "spec.teacher.model: /workspace/teacher"),
    ],
    ids=["schema", "cluster-only"],
)
def test_a_run_the_operator_would_refuse_is_refused_naming_the_field(tmp_path: Path, change, expected: str):
    doc = load(ROOT / "examples" / "tiny-math.yaml")
    change(doc)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = render_cli(str(path))
    assert proc.returncode == 2 and expected in proc.stderr and proc.stdout == "", proc.stderr


def test_the_api_server_accepts_every_rendered_object(control_plane: ControlPlane, k8s_namespace: str):
    for example in EXAMPLES:
        proc = render_cli(str(example), "--namespace", k8s_namespace)
        assert proc.returncode == 0, proc.stderr
        out = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=proc.stdout).stdout
        accepted = [line for line in out.splitlines() if line.endswith("(server dry run)")]
        served = serves_teacher(parse_run(load(example)))  # + its Deployment, Service and NetworkPolicy
        assert len(accepted) == len(list(yaml.safe_load_all(proc.stdout))) == (11 if served else 8), out
