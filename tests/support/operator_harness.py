"""The operator harness of the tests/k8s tests: ``opd-operator`` as a subprocess (``Operator``), one
DistillationRun with the stage side played by the test (``Run``), and the small readers the tests share.
Their fixtures (``cp``, ``operator_kubeconfig``, ``ns``, ``operator``, ``gpu_nodes``) are in tests/k8s/conftest.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from opd_runtime.stage_report import ProgressReporter, StatusPatcher

from support.controlplane import ControlPlane
from support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "distillationruns.opd.dev.yaml"
OPERATOR = Path(sys.executable).parent / "opd-operator"
TIMEOUT = 45.0
INDEX = "batch.kubernetes.io/job-completion-index"


class Operator:
    """``opd-operator`` as a subprocess serving one namespace; its log goes to a file."""

    def __init__(
        self,
        cp: ControlPlane,
        kubeconfig: Path,
        namespace: str,
        log_dir: Path,
        *,
        resync_seconds: float | None = 0.5,  # None: the operator's default
        args: tuple[str, ...] = (),
        name: str = "operator",
    ):
        self.cp, self.kubeconfig, self.namespace = cp, kubeconfig, namespace
        self.resync_seconds, self.args = resync_seconds, args
        self.log = log_dir / f"{name}-{namespace}.log"
        self.proc: subprocess.Popen | None = None
        self.metrics_port = self.health_port = 0
        self.starts = 0

    def start(self) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        env = {**self.cp.env, "KUBECONFIG": str(self.kubeconfig), "PYTHONSAFEPATH": "1"}
        self.starts += 1
        with open(self.log, "a") as out:
            out.write(f"\n===== start {self.starts} =====\n")
            out.flush()
            self.proc = subprocess.Popen(
                [
                    str(OPERATOR),
                    "--namespace",
                    self.namespace,
                    *(["--resync-seconds", str(self.resync_seconds)] if self.resync_seconds else []),
                    "--metrics-port",
                    str(self.metrics_port),
                    "--liveness",
                    f"http://127.0.0.1:{self.health_port}/healthz",
                    "--verbose",
                    *self.args,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.cp.wait("the operator's liveness endpoint", lambda: self.http(self.health_port, "/healthz"), timeout=30)

    def http(self, port: int, path: str) -> str | None:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"the operator exited:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return resp.read().decode()
        except OSError:
            return None

    def metrics(self) -> str:
        return self.http(self.metrics_port, "/metrics") or ""

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def tiny_math(name: str = "tiny-math", **spec: Any) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-math.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"].update(spec)
    return doc


class Run:
    """One DistillationRun in a test namespace, with the stage side played by the test."""

    def __init__(self, cp: ControlPlane, ns: str, doc: dict):
        self.cp, self.ns, self.name = cp, ns, doc["metadata"]["name"]
        cp.apply(doc, namespace=ns)

    @property
    def path(self) -> str:
        return f"/apis/opd.dev/v1alpha1/namespaces/{self.ns}/distillationruns/{self.name}"

    def obj(self) -> dict:
        return self.cp.get(self.path)

    def status(self) -> dict:
        return self.obj().get("status") or {}

    def wait(self, what: str, predicate: Callable[[dict], Any], timeout: float = TIMEOUT) -> dict:
        """The status, once ``predicate(status)`` holds."""
        last: dict = {}

        def check() -> Any:
            nonlocal last
            last = self.status()
            return last if predicate(last) else None

        try:
            return self.cp.wait(what, check, timeout=timeout, interval=0.2)
        except Exception as err:
            raise AssertionError(f"{err}\nlast status: {json.dumps(last, indent=1)[:3000]}") from None

    def condition(self, type_: str) -> dict:
        return next((c for c in self.status().get("conditions", []) if c["type"] == type_), {})

    def jobs(self) -> list[str]:
        out = self.cp.get(f"/apis/batch/v1/namespaces/{self.ns}/jobs?labelSelector=opd.dev/run={self.name}")
        return sorted(j["metadata"]["name"] for j in out["items"])

    def running_pod(self, job: str, timeout: float = TIMEOUT) -> dict:
        return self.cp.wait_for_pod(
            self.ns, f"job-name={job}", lambda p: p["status"].get("phase") == "Running", "Running", timeout=timeout
        )

    def finish(self, job: str, code: int, message: dict | str) -> None:
        pod = self.running_pod(job)
        text = json.dumps(message) if isinstance(message, dict) else message
        self.cp.set_pod_exit(self.ns, pod["metadata"]["name"], code, text)

    def report_progress(self, stage: str, step: int, total: int, reverse_kl: float | None = None) -> None:
        """What the stage process does: patch status.progress with its own ServiceAccount token."""
        token = self.cp.kubectl("create", "token", f"{self.name}-stage", f"--namespace={self.ns}").stdout.strip()
        token_file = self.cp.dir / f"token-{self.ns}-{self.name}"
        token_file.write_text(token)
        patcher = StatusPatcher(
            self.name, self.ns, api=self.cp.api_url, token_file=token_file, ca_file=self.cp.pki / "ca.crt"
        )
        reporter = ProgressReporter(stage, total, patcher, interval=0.01)
        reporter({"step": step, "reverse_kl": reverse_kl})
        reporter.close()
        assert self.status().get("progress", {}).get("step") == step, "the stage's progress report did not land"

    def get_dr(self) -> dict[str, str]:
        """`kubectl get dr NAME`: printer column -> value."""
        header, row = self.cp.kubectl("get", "dr", self.name, "-n", self.ns).stdout.splitlines()[:2]
        starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
        ends = [*starts[1:], None]
        return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends)}

    def events(self) -> list[str]:
        items = self.cp.get(f"/api/v1/namespaces/{self.ns}/events")["items"]
        return [e["reason"] for e in items if e["involvedObject"].get("name") == self.name]


def exists(cp: ControlPlane, path: str) -> bool:
    return cp.request("GET", path, ok=(200, 404)).get("kind") not in (None, "Status")


def events_of(cp: ControlPlane, ns: str, run: str, reason: str) -> list[dict]:
    items = cp.get(f"/api/v1/namespaces/{ns}/events")["items"]
    return [e for e in items if e["involvedObject"].get("name") == run and e["reason"] == reason]


def count_events(cp: ControlPlane, ns: str, run: str, reason: str, at_least: int = 1) -> int:
    """How many ``reason`` Events the run has, once it has ``at_least`` and a few more resyncs (the operator
    runs with --resync-seconds 0.5) had the chance to post a duplicate."""
    cp.wait(f"{at_least} {reason} event(s)", lambda: len(events_of(cp, ns, run, reason)) >= at_least, timeout=TIMEOUT)
    time.sleep(2)
    return len(events_of(cp, ns, run, reason))


def sft_only(name: str, sft: dict, **spec) -> dict:
    """examples/tiny-math.yaml with only its sft stage, on a ReadWriteMany workspace (every pod mounts it)."""
    doc = tiny_math(name, workspace={"size": "2Gi", "accessModes": ["ReadWriteMany"]}, **spec)
    doc["spec"]["sft"].update(sft)
    doc["spec"]["distill"]["enabled"] = False
    doc["spec"]["eval"]["enabled"] = False
    return doc


def gang(cp: ControlPlane, ns: str, job: str, count: int = 2) -> list[dict]:
    """The Job's ``count`` pods once all run, in index order."""

    def running() -> list[dict] | None:
        pods = [p for p in cp.pods(ns, f"job-name={job}") if p["status"].get("phase") == "Running"]
        return sorted(pods, key=lambda p: int(p["metadata"]["annotations"][INDEX])) if len(pods) == count else None

    return cp.wait(f"{count} running pods of {job}", running, timeout=TIMEOUT)
