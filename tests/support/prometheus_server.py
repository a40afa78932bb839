"""A real Prometheus for the tests: Debian's package, unpacked without root, and a small client.

- ``ensure_prometheus()``: the ``prometheus`` binary of Debian's package ``prometheus`` at
  ``PROMETHEUS_VERSION``, unpacked once into ``$OPD_CACHE_DIR/prometheus-<version>/`` (``dpkg-deb -x``,
  nothing installed). The .deb comes from ``apt-get download`` (apt checks it against the signed archive)
  or, where apt has no such version, from deb.debian.org, checked against ``DEB_SHA256``. The binary is a
  Go program linked against libc only. ``python tests/support/prometheus_server.py`` fetches it (``make test``
  does, before pytest, like the control-plane binaries).
- Debian builds Prometheus without Kubernetes service discovery (``kubernetes_sd_configs`` is unknown to
  it): ``KubernetesDiscovery`` serves the targets and ``__meta_kubernetes_*`` labels that discovery would
  find (roles ``pod`` and ``endpoints``) over Prometheus' HTTP service discovery, read from a real API
  server on every refresh.
- ``monitor_scrape_configs()``: the scrape jobs prometheus-operator generates for a ServiceMonitor or a
  PodMonitor (the parts the opd chart uses), so a test scrapes exactly what the chart's monitors select
  and labels series the way they would be labelled in a cluster.
- ``Prometheus``: the server as a subprocess on 127.0.0.1, and the HTTP API calls the tests make.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:  # as part of the test session (tests/ on sys.path), or as a script (python tests/support/...)
    from support.controlplane import binaries
    from support.controlplane.cluster import _set_pdeathsig
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.controlplane import binaries
    from support.controlplane.cluster import _set_pdeathsig

PROMETHEUS_VERSION = "2.42.0+ds-5+deb12u1"  # Debian 12 (bookworm)
DEB_URL = "https://deb.debian.org/debian/pool/main/p/prometheus/prometheus_{version}_{arch}.deb"
DEB_SHA256 = {"amd64": "81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55"}


def prometheus_dir() -> Path:
    return binaries.cache_root() / f"prometheus-{PROMETHEUS_VERSION}"


def prometheus_binary() -> Path:
    return prometheus_dir() / "usr" / "bin" / "prometheus"


def _debian_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _download_deb(dest: Path) -> Path:
    """The package file, by apt first, else from the Debian archive (checked against DEB_SHA256)."""
    errors = []
    if shutil.which("apt-get"):
        proc = subprocess.run(
            ["apt-get", "download", f"prometheus={PROMETHEUS_VERSION}"],
            cwd=dest,
            capture_output=True,
            text=True,
        )
        debs = sorted(dest.glob("prometheus_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[0]
        errors.append(f"apt-get download prometheus={PROMETHEUS_VERSION}: {(proc.stderr or proc.stdout).strip()}")
    arch = _debian_arch()
    url = DEB_URL.format(version=urllib.parse.quote(PROMETHEUS_VERSION), arch=arch)
    path = dest / f"prometheus_{arch}.deb"
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, open(path, "wb") as out:
            shutil.copyfileobj(resp, out)
    except OSError as err:
        errors.append(f"{url}: {err}")
        raise RuntimeError("cannot download Prometheus: " + "; ".join(errors)) from err
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = DEB_SHA256.get(arch)
    if expected is None or digest != expected:
        raise RuntimeError(f"{url}: sha256 {digest}, expected {expected or '(no checksum recorded for ' + arch + ')'}")
    return path


def ensure_prometheus() -> Path:
    """The Prometheus binary, downloaded and unpacked on first use; raises RuntimeError saying why not."""
    binary = prometheus_binary()
    with binaries._locked(binaries.cache_root() / "prometheus.lock"):
        if not binary.is_file():
            if shutil.which("dpkg-deb") is None:
                raise RuntimeError("dpkg-deb is needed to unpack Debian's prometheus package (install dpkg)")
            binaries.log(f"downloading Prometheus {PROMETHEUS_VERSION} (Debian package) into {prometheus_dir()}")
            with tempfile.TemporaryDirectory() as tmp:
                deb = _download_deb(Path(tmp))
                unpacked = Path(tmp) / "root"
                subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
                shutil.rmtree(prometheus_dir(), ignore_errors=True)
                prometheus_dir().parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(unpacked), prometheus_dir())
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    upstream = PROMETHEUS_VERSION.split("+")[0]  # 2.42.0+ds-5+deb12u1 -> 2.42.0
    if proc.returncode != 0 or f"prometheus, version {upstream}" not in proc.stdout + proc.stderr:
        raise RuntimeError(f"{binary} --version failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    return binary


# ---- what prometheus-operator generates for a monitor -------------------------------------------------

_RELABEL_KEYS = {
    "sourceLabels": "source_labels",
    "targetLabel": "target_label",
    "separator": "separator",
    "regex": "regex",
    "replacement": "replacement",
    "modulus": "modulus",
    "action": "action",
}


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _relabelings(items: list[dict]) -> list[dict]:
    out = []
    for item in items:
        rule = {_RELABEL_KEYS[k]: v for k, v in item.items()}
        if "action" in rule:
            rule["action"] = rule["action"].lower()
        out.append(rule)
    return out


def monitor_scrape_configs(
    monitor: dict, discovery: KubernetesDiscovery, extra_relabelings: Sequence[dict] = ()
) -> list[dict]:
    """The scrape jobs of one ServiceMonitor or PodMonitor, as prometheus-operator (v0.7x+) writes them:
    Kubernetes discovery (role endpoints / pod, from ``discovery``) in the monitor's namespaces, `keep`
    rules for the label selector and the port name, the standard target labels (namespace, service, pod, container, job,
    endpoint), completed pods dropped, then the endpoint's own relabelings. Only the fields the opd chart
    uses are translated; anything else fails loudly. ``extra_relabelings`` go last."""
    kind, meta, spec = monitor["kind"], monitor["metadata"], monitor["spec"]
    known = {"selector", "namespaceSelector", "endpoints", "podMetricsEndpoints", "jobLabel"}
    if set(spec) - known:
        raise ValueError(f"{kind} {meta['name']}: untranslated fields {sorted(set(spec) - known)}")
    if kind == "ServiceMonitor":
        role, endpoints, label_prefix = "endpoints", spec["endpoints"], "__meta_kubernetes_service_label"
        port_label = "__meta_kubernetes_endpoint_port_name"
    elif kind == "PodMonitor":
        role, endpoints, label_prefix = "pod", spec["podMetricsEndpoints"], "__meta_kubernetes_pod_label"
        port_label = "__meta_kubernetes_pod_container_port_name"
    else:
        raise ValueError(f"not a monitor: {kind}")
    ns_selector = spec.get("namespaceSelector", {})
    if ns_selector.get("any"):
        raise ValueError(f"{kind} {meta['name']}: namespaceSelector.any is not translated")
    namespaces = ns_selector.get("matchNames") or [meta["namespace"]]
    sd = {"url": discovery.url(role, namespaces), "refresh_interval": "1s"}
    selector = spec["selector"]
    if set(selector) - {"matchLabels"}:
        raise ValueError(f"{kind} {meta['name']}: only selector.matchLabels is translated")
    jobs = []
    for i, ep in enumerate(endpoints):
        known_ep = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings"}
        if set(ep) - known_ep:
            raise ValueError(f"{kind} {meta['name']} endpoint {i}: untranslated fields {sorted(set(ep) - known_ep)}")
        relabel = [
            {
                "action": "keep",
                "source_labels": [f"{label_prefix}_{_sanitize(k)}", f"{label_prefix}present_{_sanitize(k)}"],
                "regex": f"({re.escape(v)});true",
            }
            for k, v in selector.get("matchLabels", {}).items()
        ]
        relabel.append({"action": "keep", "source_labels": [port_label], "regex": ep["port"]})
        if kind == "ServiceMonitor":
            relabel += [
                {
                    "source_labels": [
                        "__meta_kubernetes_endpoint_address_target_kind",
                        "__meta_kubernetes_endpoint_address_target_name",
                    ],
                    "separator": ";",
                    "regex": "Pod;(.*)",
                    "replacement": "${1}",
                    "target_label": "pod",
                },
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"},
            ]
        else:
            relabel += [
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            ]
        relabel += [
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            {"target_label": "endpoint", "replacement": ep["port"]},
            *_relabelings(ep.get("relabelings", [])),
            *extra_relabelings,
        ]
        job: dict[str, Any] = {
            "job_name": f"{kind[0].lower()}{kind[1:]}/{meta['namespace']}/{meta['name']}/{i}",
            "honor_labels": bool(ep.get("honorLabels", False)),
            "metrics_path": ep.get("path", "/metrics"),
            "http_sd_configs": [sd],
            "relabel_configs": relabel,
        }
        if "interval" in ep:
            job["scrape_interval"] = ep["interval"]
        if "scrapeTimeout" in ep:
            job["scrape_timeout"] = ep["scrapeTimeout"]
        jobs.append(job)
    return jobs


# ---- Kubernetes discovery over HTTP SD ----------------------------------------------------------------


def _meta_labels(prefix: str, labels: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in labels.items():
        out[f"{prefix}_label_{_sanitize(key)}"] = value
        out[f"{prefix}_labelpresent_{_sanitize(key)}"] = "true"
    return out


def _pod_meta(pod: dict) -> dict[str, str]:
    meta, status = pod["metadata"], pod.get("status", {})
    owner = next((o for o in meta.get("ownerReferences", []) if o.get("controller")), {})
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    return {
        "__meta_kubernetes_namespace": meta["namespace"],
        "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_ip": status.get("podIP", ""),
        "__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", ""),
        "__meta_kubernetes_pod_phase": status.get("phase", ""),
        "__meta_kubernetes_pod_ready": str(ready).lower(),
        "__meta_kubernetes_pod_uid": meta.get("uid", ""),
        "__meta_kubernetes_pod_controller_kind": owner.get("kind", ""),
        "__meta_kubernetes_pod_controller_name": owner.get("name", ""),
        **_meta_labels("__meta_kubernetes_pod", meta.get("labels", {})),
    }


def _container_port_meta(container: dict, port: dict) -> dict[str, str]:
    return {
        "__meta_kubernetes_pod_container_name": container["name"],
        "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
        "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
    }


class KubernetesDiscovery:
    """Serves, on 127.0.0.1, the target groups Prometheus' ``kubernetes_sd_configs`` would discover for
    roles ``pod`` (a target per declared container port of every pod with an IP) and ``endpoints`` (a
    target per address and port of every Endpoints object, with its Service's and its Pod's labels), read
    with ``get`` (an API GET returning the decoded JSON) on each request."""

    def __init__(self, get: Callable[[str], Any]):
        import http.server
        import threading

        discovery = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parsed = urllib.parse.urlparse(self.path)
                namespaces = urllib.parse.parse_qs(parsed.query).get("namespace", [])
                try:
                    body = json.dumps(discovery.target_groups(parsed.path.strip("/"), namespaces)).encode()
                    code = 200
                except Exception as err:  # Prometheus logs the failed refresh and keeps the last targets
                    body, code = f"{type(err).__name__}: {err}".encode(), 500
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # Prometheus stopped
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.get = get
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, role: str, namespaces: list[str]) -> str:
        query = urllib.parse.urlencode({"namespace": namespaces}, doseq=True)
        return f"http://127.0.0.1:{self.server.server_address[1]}/{role}?{query}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def target_groups(self, role: str, namespaces: list[str]) -> list[dict]:
        groups = []
        for ns in namespaces:
            if role == "pod":
                for pod in self.get(f"/api/v1/namespaces/{ns}/pods")["items"]:
                    groups += self._pod_groups(pod)
            elif role == "endpoints":
                services = {s["metadata"]["name"]: s for s in self.get(f"/api/v1/namespaces/{ns}/services")["items"]}
                pods = {p["metadata"]["name"]: p for p in self.get(f"/api/v1/namespaces/{ns}/pods")["items"]}
                for ep in self.get(f"/api/v1/namespaces/{ns}/endpoints")["items"]:
                    groups += self._endpoints_groups(ep, services.get(ep["metadata"]["name"]), pods)
            else:
                raise ValueError(f"unknown role {role!r}")
        return groups

    @staticmethod
    def _pod_groups(pod: dict) -> list[dict]:
        """A group per declared container port (HTTP SD gives one label set per group)."""
        meta = _pod_meta(pod)
        if not meta["__meta_kubernetes_pod_ip"]:
            return []
        return [
            {
                "targets": [f"{meta['__meta_kubernetes_pod_ip']}:{port['containerPort']}"],
                "labels": {**meta, **_container_port_meta(container, port)},
            }
            for container in pod["spec"]["containers"]
            for port in container.get("ports", [])
        ]

    @staticmethod
    def _endpoints_groups(ep: dict, service: dict | None, pods: dict[str, dict]) -> list[dict]:
        base = {
            "__meta_kubernetes_namespace": ep["metadata"]["namespace"],
            "__meta_kubernetes_endpoints_name": ep["metadata"]["name"],
        }
        if service is not None:
            base["__meta_kubernetes_service_name"] = service["metadata"]["name"]
            base.update(_meta_labels("__meta_kubernetes_service", service["metadata"].get("labels", {})))
        groups = []
        for subset in ep.get("subsets", []):
            for ready, key in (("true", "addresses"), ("false", "notReadyAddresses")):
                for address in subset.get(key, []):
                    for port in subset.get("ports", []):
                        labels = {
                            **base,
                            "__meta_kubernetes_endpoint_port_name": port.get("name", ""),
                            "__meta_kubernetes_endpoint_port_protocol": port.get("protocol", "TCP"),
                            "__meta_kubernetes_endpoint_ready": ready,
                        }
                        ref = address.get("targetRef") or {}
                        if ref:
                            labels["__meta_kubernetes_endpoint_address_target_kind"] = ref.get("kind", "")
                            labels["__meta_kubernetes_endpoint_address_target_name"] = ref.get("name", "")
                        pod = pods.get(ref.get("name", "")) if ref.get("kind") == "Pod" else None
                        if pod is not None:
                            labels.update(_pod_meta(pod))
                            for container in pod["spec"]["containers"]:
                                for cport in container.get("ports", []):
                                    if cport["containerPort"] == port["port"]:
                                        labels.update(_container_port_meta(container, cport))
                        groups.append({"targets": [f"{address['ip']}:{port['port']}"], "labels": labels})
        return groups


# ---- the server ---------------------------------------------------------------------------------------


class PromQLError(Exception):
    """Prometheus answered a query with an error (bad syntax, wrong types, ...)."""


class Prometheus:
    """``prometheus`` on 127.0.0.1:``port`` with ``config``, its TSDB and log in ``workdir``."""

    def __init__(self, binary: Path, config: dict, workdir: Path, port: int):
        self.binary, self.config, self.workdir, self.port = binary, config, workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        import yaml

        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_pdeathsig,  # no Prometheus outlives a killed pytest
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"prometheus not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``'s ``data``; a PromQLError carrying Prometheus' message on an error."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None}, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query (what a stat, gauge or table panel asks); its result series."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] not in ("vector", "matrix"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` lists."""
        return self.api(f"label/{label}/values", **{"match[]": match})

    def targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]


if __name__ == "__main__":
    print(ensure_prometheus())
