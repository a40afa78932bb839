"""Helpers for the tests of charts/opd-operator: the helm binary, rendering, the operator's RBAC rules, and
``install``/``uninstall`` of a release on the test control plane.

helm is the static release binary the control-plane helper caches (``support.controlplane.binaries``); only it is
fetched here (no cluster is needed to lint or render a chart).
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from support.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "opd-operator"
# The documented variants of the chart's values (each also linted and rendered).
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "opd"
CRD = "distillationruns.opd.dev"


def helm_binary() -> Path:
    from support.controlplane import binaries

    path = binaries.binary_path("helm")
    if not path.is_file():
        binaries.fetch_kubectl_helm()  # installs kubectl and helm atomically into the shared cache
    return path


def helm(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"`helm {' '.join(args)}` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def values_args(values_file: Path | None = None, sets: dict[str, str] | None = None) -> list[str]:
    args = ["--values", str(values_file)] if values_file else []
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def render_text(
    values_file: Path | None = None,
    sets: dict[str, str] | None = None,
    *,
    namespace: str = "opd-system",
    release: str = RELEASE,
) -> str:
    return helm("template", release, str(CHART), "--namespace", namespace, *values_args(values_file, sets)).stdout


def render(values_file: Path | None = None, sets: dict[str, str] | None = None, **kw: Any) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(values_file, sets, **kw)) if d]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def load_sync():
    """charts/sync.py (not a package module: the chart folder's generator script)."""
    spec = importlib.util.spec_from_file_location("opd_chart_sync", CHART.parent / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rule_triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) for every combination a list of RBAC rules grants."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def adopt_crd(cp: ControlPlane, release: str, namespace: str) -> None:
    """Let this release take over the DistillationRun CRD if it already exists (installed by another
    release or by `kubectl apply -f crds/`): Helm adopts objects that carry its ownership metadata."""
    if cp.kubectl("get", "crd", CRD, check=False).returncode != 0:
        return
    cp.kubectl(
        "annotate",
        "--overwrite",
        "crd",
        CRD,
        f"meta.helm.sh/release-name={release}",
        f"meta.helm.sh/release-namespace={namespace}",
    )
    cp.kubectl("label", "--overwrite", "crd", CRD, "app.kubernetes.io/managed-by=Helm")


def install(cp: ControlPlane, release: str, namespace: str, *args: str) -> str:
    adopt_crd(cp, release, namespace)
    return cp.helm(
        "install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s", *args
    ).stdout


def uninstall(cp: ControlPlane, release: str, namespace: str) -> None:
    """Remove a release (the session's cluster is shared: leave no releases behind for other tests)."""
    cp.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", check=False)
