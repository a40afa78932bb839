"""The prometheus-operator CRDs (ServiceMonitor, PodMonitor), so the test API server validates the chart's
monitors against their real schemas.

They are generated the way prometheus-operator generates its own: controller-gen
(``sigs.k8s.io/controller-tools``) over the API types of the Go module
``github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring``, both built from the Go module
proxy in a throwaway wrapper module. The output is cached by version in
``$OPD_CACHE_DIR/k8s/monitoring-crds-<version>/`` (Go caches as in ``controlplane.binaries``).
``python tests/support/monitoring_crds.py`` builds them and prints the folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # as part of the test session (tests/ on sys.path), or as a script (python tests/support/...)
    from support.controlplane import binaries
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.controlplane import binaries

PROMETHEUS_OPERATOR_VERSION = "v0.95.2"
CONTROLLER_TOOLS_VERSION = "v0.23.0"
API_MODULE = "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring"
# The kinds the chart renders (monitoring.coreos.com/v1).
KINDS = ("servicemonitors", "podmonitors")


def crd_dir() -> Path:
    return binaries.cache_root() / "k8s" / f"monitoring-crds-{PROMETHEUS_OPERATOR_VERSION}"


def crd_files() -> list[Path]:
    return [crd_dir() / f"monitoring.coreos.com_{kind}.yaml" for kind in KINDS]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    binaries.log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}) in {cwd}:\n{proc.stdout[-8000:]}")


def build() -> None:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("the Go toolchain (`go`) is needed to generate the prometheus-operator CRDs; not on PATH")
    env = binaries.go_env()
    with tempfile.TemporaryDirectory(prefix="opd-monitoring-crds-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text(
            "module opd.dev/monitoring-crds\n\ngo 1.26\n\n"
            f"require (\n\tsigs.k8s.io/controller-tools {CONTROLLER_TOOLS_VERSION}\n"
            f"\t{API_MODULE} {PROMETHEUS_OPERATOR_VERSION}\n)\n"
        )
        # A blank import keeps the API module in the build list for controller-gen's package loader.
        (work / "tools.go").write_text(
            "//go:build tools\n\npackage tools\n\nimport (\n"
            '\t_ "sigs.k8s.io/controller-tools/cmd/controller-gen"\n'
            f'\t_ "{API_MODULE}/v1"\n)\n'
        )
        t0 = time.monotonic()
        binaries.log(
            f"building controller-gen {CONTROLLER_TOOLS_VERSION} for the prometheus-operator "
            f"{PROMETHEUS_OPERATOR_VERSION} CRDs"
        )
        _run(
            [
                go,
                "build",
                "-trimpath",
                "-ldflags=-s -w",
                "-o",
                str(work / "controller-gen"),
                "sigs.k8s.io/controller-tools/cmd/controller-gen",
            ],
            work,
            env,
        )
        out = work / "crds"
        # maxDescLen=0: descriptions are not needed for validation and keep the objects small.
        _run(
            [
                str(work / "controller-gen"),
                "crd:crdVersions=v1,maxDescLen=0",
                f"paths={API_MODULE}/v1",
                f"output:crd:dir={out}",
            ],
            work,
            env,
        )
        binaries.log(f"generated the monitoring CRDs in {time.monotonic() - t0:.0f}s")
        dest = crd_dir()
        staged = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for kind in KINDS:
            shutil.copy2(out / f"monitoring.coreos.com_{kind}.yaml", staged)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)


def ensure() -> list[Path]:
    """The CRD files, generating them first when the cache lacks them."""
    if not all(p.is_file() for p in crd_files()):
        with binaries._locked(binaries.cache_root() / "k8s" / ".monitoring-crds.lock"):
            if not all(p.is_file() for p in crd_files()):
                build()
    return crd_files()


if __name__ == "__main__":
    for path in ensure():
        print(path)
