"""A real Kubernetes control plane as local processes on 127.0.0.1, for tests.

``start()`` runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (binaries from
``binaries.py``) in one process group, in a temporary cluster directory that holds the certificates,
kubeconfigs and each component's log (``<dir>/logs/<component>.log``), and registers:

- the fake node ``gpu-node-0`` (kwok plays its kubelet: see ``kwok_stages.yaml``): labels
  ``nvidia.com/gpu.present=true``; allocatable cpu 64, memory 512Gi, pods 110, nvidia.com/gpu 8;
- the default StorageClass ``standard`` (Immediate binding): kwok's volume stages provision a hostPath
  PersistentVolume for every claim with a storage class and bind it, so pods that mount a claim are
  scheduled and run.

Identities: the admin kubeconfig (``ControlPlane.kubeconfig``) holds a client certificate in
``system:masters``. Tests act as other identities through impersonation (``kubectl(..., as_user=...)``,
``request(..., as_user=...)``) or with a real ServiceAccount token (``serviceaccount_kubeconfig``).
The API server authorises with Node,RBAC and enforces PodSecurity per namespace labels.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import binaries

HERE = Path(__file__).resolve().parent
STAGES = HERE / "kwok_stages.yaml"

NODE_NAME = "gpu-node-0"
EXIT_CODE_ANNOTATION = "opd.dev/kwok-exit-code"
TERMINATION_MESSAGE_ANNOTATION = "opd.dev/kwok-termination-message"
# Pods whose first container has this image stay Pending once scheduled (kwok_stages.yaml, pod-ready).
HELD_IMAGE = "registry.invalid/opd:kwok-held"
STORAGE_CLASS = "standard"
SERVICE_CIDR = "10.0.0.0/24"
ADMIN_USER = "opd-admin"
# Requests by ServiceAccounts (the operator's, the stages') are audited at Metadata level into
# logs/audit.log, so a test can read which (group, resource, verb) an identity really used.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""

T = TypeVar("T")

NODE_AND_STORAGE = f"""\
apiVersion: v1
kind: Node
metadata:
  name: {NODE_NAME}
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/arch: amd64
    kubernetes.io/hostname: {NODE_NAME}
    kubernetes.io/os: linux
    type: kwok
    nvidia.com/gpu.present: "true"
status:
  allocatable: {{cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}}
  capacity: {{cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {STORAGE_CLASS}
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: kwok.x-k8s.io/volume
reclaimPolicy: Delete
volumeBindingMode: Immediate
"""


def restricted_security_context() -> dict:
    """A container securityContext that PodSecurity ``restricted`` admits."""
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container(name: str = "main", image: str = "registry.invalid/opd:test", **extra: Any) -> dict:
    """A container that PodSecurity ``restricted`` admits (kwok never pulls the image)."""
    return {"name": name, "image": image, "securityContext": restricted_security_context(), **extra}


class ControlPlaneError(RuntimeError):
    pass


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any, what: str):
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{what}: HTTP {status}: {msg}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"`openssl {' '.join(args)}` failed:\n{proc.stderr}")


def make_pki(pki: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """A CA; the API server's serving certificate (also valid for ``extra_ips``); the admin client
    certificate (system:masters); the service-account signing key pair. ECDSA P-256 throughout: key
    generation takes milliseconds."""
    if shutil.which("openssl") is None:
        raise ControlPlaneError("openssl is needed to make the control plane's certificates; not on PATH")
    pki.mkdir(parents=True)
    for key in ("ca", "apiserver", "admin", "sa"):
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{key}.key", cwd=pki)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=opd-test-ca",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    sans = ",".join(
        [
            "IP:127.0.0.1",
            "IP:10.0.0.1",
            *(f"IP:{ip}" for ip in extra_ips),
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
    )
    for name, subj, ext in (
        ("apiserver", "/CN=kube-apiserver", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        ("admin", f"/O=system:masters/CN={ADMIN_USER}", "extendedKeyUsage=clientAuth\n"),
    ):
        (pki / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + ext)
        _openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=pki)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=pki,
        )


def _kubeconfig(server: str, ca: Path, user: dict[str, str]) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "opd-test",
            "clusters": [{"name": "opd-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "opd-test", "context": {"cluster": "opd-test", "user": "user"}}],
        },
        indent=2,
    )


def _set_pdeathsig() -> None:
    """In the child before exec: die with the parent (no orphans even if pytest is killed). Linux sends the
    signal when the *thread* that started the child ends: start a cluster from a thread that outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Component:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"


@dataclass
class ControlPlane:
    """A running control plane; see the module docstring. Use ``start()`` to make one."""

    dir: Path
    binaries: dict[str, Path]
    api_url: str = ""
    kubeconfig: Path = field(init=False)
    components: dict[str, Component] = field(default_factory=dict)
    startup_seconds: float = 0.0
    _pgid: int | None = None
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"

    # ---- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> Component:
        self.logs.mkdir(exist_ok=True)
        log = self.logs / f"{name}.log"
        pgid = self._pgid

        def preexec() -> None:
            os.setpgid(0, pgid or 0)  # one process group for the whole cluster
            _set_pdeathsig()

        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(self.binaries[name]), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                preexec_fn=preexec,
            )
        if self._pgid is None:
            self._pgid = proc.pid
        comp = Component(name, proc, log)
        self.components[name] = comp
        return comp

    def _check_alive(self) -> None:
        for comp in self.components.values():
            if comp.proc.poll() is not None:
                raise ControlPlaneError(
                    f"{comp.name} exited with code {comp.proc.returncode}; last lines of {comp.log}:\n{comp.tail()}"
                )

    def wait(
        self,
        what: str,
        predicate: Callable[[], T],
        timeout: float = 60.0,
        interval: float = 0.2,
        component: str | None = None,
    ) -> T:
        """Poll ``predicate`` until it returns something truthy; raise with the components' state if not."""
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while True:
            self._check_alive()
            try:
                value = predicate()
                if value:
                    return value
            except (OSError, ApiError, ssl.SSLError, http.client.HTTPException) as err:
                last_err = err
            if time.monotonic() > deadline:
                detail = f" (last error: {last_err})" if last_err else ""
                tail = ""
                if component and component in self.components:
                    tail = f"\nlast lines of {self.components[component].log}:\n{self.components[component].tail()}"
                raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{tail}")
            time.sleep(interval)

    def stop(self, keep_dir: bool = False) -> None:
        """Stop every component and remove the cluster directory (kept with ``keep_dir`` or
        OPD_KEEP_CLUSTER=1). SIGTERM to the process group, SIGKILL after 1 s: nothing is kept, and the
        API server alone would drain its requests for 10 s."""
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._pgid, signal.SIGTERM)
            deadline = time.monotonic() + 1
            for comp in self.components.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    comp.proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._pgid, signal.SIGKILL)
            for comp in self.components.values():
                comp.proc.wait()
            self._pgid = None
        if not keep_dir and os.environ.get("OPD_KEEP_CLUSTER") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- REST (stdlib only) ----------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        as_user: str | None = None,
        as_groups: list[str] | None = None,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> Any:
        """One API request as the admin (or impersonating ``as_user``); returns the decoded JSON body,
        raises ApiError for a status outside ``ok``."""
        headers = {"Accept": "application/json"}
        for k, v in _impersonation_headers(as_user, as_groups):
            headers[k] = v
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            headers["Content-Type"] = content_type
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._ssl_context(), timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            decoded = raw.decode(errors="replace")
        if resp.status not in ok:
            raise ApiError(resp.status, decoded, f"{method} {path}")
        return decoded

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    @property
    def port(self) -> int:
        return int(self.api_url.rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        return self.api_url.removeprefix("https://").rsplit(":", 1)[0]

    # ---- clients ---------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (kubectl, helm, kopf, the operator) that read KUBECONFIG."""
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            KUBECACHEDIR=str(self.dir / "kube-cache"),
            HELM_CACHE_HOME=str(self.dir / "helm" / "cache"),
            HELM_CONFIG_HOME=str(self.dir / "helm" / "config"),
            HELM_DATA_HOME=str(self.dir / "helm" / "data"),
        )
        return env

    def kubectl(
        self,
        *args: str,
        as_user: str | None = None,
        as_groups: list[str] | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster as the admin, or impersonating ``as_user`` (a ServiceAccount
        user ``system:serviceaccount:NS:NAME`` gets its groups too). ``check`` raises with the output."""
        cmd = [str(self.binaries["kubectl"]), f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        for k, v in _impersonation_headers(as_user, as_groups):
            cmd.append(f"--as={v}" if k == "Impersonate-User" else f"--as-group={v}")
        cmd.extend(args)
        return _run_client(cmd, self.env, input, check, timeout)

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until each CRD (``name.group``) is Established. Polls instead of ``kubectl wait
        --for=condition=Established``: right after an apply the CRD may have no status.conditions yet,
        and kubectl wait then fails at once ("accessor error") instead of waiting."""
        deadline = time.monotonic() + timeout
        for crd in crds:
            while True:
                out = self.kubectl(
                    "get",
                    f"crd/{crd}",
                    "-o",
                    'jsonpath={.status.conditions[?(@.type=="Established")].status}',
                    check=False,
                )
                if out.returncode == 0 and out.stdout.strip() == "True":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {crd} not Established after {timeout} s: {out.stdout}{out.stderr}")
                time.sleep(0.2)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binaries["helm"]), f"--kubeconfig={self.kubeconfig}", *args]
        return _run_client(cmd, self.env, input, check, timeout)

    def apply(self, manifest: str | dict | list, namespace: str | None = None, **kw: Any) -> str:
        """``kubectl apply -f -`` of YAML text, or of objects (dicts, or a list of them)."""
        if not isinstance(manifest, str):
            items = manifest if isinstance(manifest, list) else [manifest]
            manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        ns = [f"--namespace={namespace}"] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=manifest, **kw).stdout

    def serviceaccount_kubeconfig(self, namespace: str, name: str, duration: str = "2h") -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` with a real token from the
        TokenRequest API (the ServiceAccount must exist): proves RBAC without impersonation."""
        token = self.kubectl("create", "token", name, f"--namespace={namespace}", f"--duration={duration}").stdout
        path = self.dir / f"sa-{namespace}-{name}.kubeconfig"
        path.write_text(_kubeconfig(self.api_url, self.pki / "ca.crt", {"token": token.strip()}))
        return path

    # ---- helpers for tests -----------------------------------------------------------------------
    def new_namespace(
        self, prefix: str = "test", *, enforce: str = "restricted", labels: dict[str, str] | None = None
    ) -> str:
        """Create a namespace ``<prefix>-<n>-<random>`` with PodSecurity ``enforce`` (restricted by default);
        returns once its ``default`` ServiceAccount exists (pods can be created)."""
        name = f"{prefix}-{next(self._names)}-{secrets.token_hex(2)}"[:63]
        all_labels = {
            "pod-security.kubernetes.io/enforce": enforce,
            "pod-security.kubernetes.io/enforce-version": "latest",
            **(labels or {}),
        }
        self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": all_labels}},
        )
        self.wait(
            f"the default ServiceAccount of namespace {name}",
            lambda: (
                self.get(f"/api/v1/namespaces/{name}/serviceaccounts/default", ok=(200, 404)).get("kind")
                == "ServiceAccount"
            ),
            timeout=60,
            component="kube-controller-manager",
        )
        return name

    def set_pod_exit(self, namespace: str, pod: str, code: int, message: str = "") -> None:
        """Make pod ``namespace/pod`` exit (kwok stage ``opd-pod-exit``): each container terminates with
        ``code`` and termination message ``message``; the pod becomes Succeeded (0) or Failed."""
        patch = {
            "metadata": {"annotations": {EXIT_CODE_ANNOTATION: str(int(code)), TERMINATION_MESSAGE_ANNOTATION: message}}
        }
        self.request(
            "PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}", patch, content_type="application/merge-patch+json"
        )

    def set_pod_waiting(self, namespace: str, pod: str, reason: str, message: str = "") -> None:
        """Write what a kubelet reports for a pod whose containers cannot start (``reason`` e.g. ErrImagePull,
        CreateContainerConfigError): phase Pending, every container waiting. Only for pods kwok leaves
        alone: image ``HELD_IMAGE`` (kwok would otherwise make the pod Running again)."""
        current = self.get(f"/api/v1/namespaces/{namespace}/pods/{pod}")
        statuses = [
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
            for c in current["spec"]["containers"]
        ]
        patch = {"status": {"phase": "Pending", "containerStatuses": statuses}}
        self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{pod}/status",
            patch,
            content_type="application/merge-patch+json",
        )

    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        from urllib.parse import quote

        query = f"?labelSelector={quote(selector)}" if selector else ""
        return self.get(f"/api/v1/namespaces/{namespace}/pods{query}")["items"]

    def wait_for_pod(
        self, namespace: str, selector: str, predicate: Callable[[dict], bool], what: str, timeout: float = 60.0
    ) -> dict:
        """The first pod matching ``selector`` for which ``predicate(pod)`` holds, waiting for it."""
        return self.wait(
            f"a pod ({selector}) in {namespace} that is {what}",
            lambda: next((p for p in self.pods(namespace, selector) if predicate(p)), None),
            timeout=timeout,
        )

    def audit(self, user: str) -> list[dict]:
        """The API server's audit events (Metadata level: verb, objectRef, responseStatus) of requests made
        by ``user`` (a ServiceAccount's username), oldest first."""
        events = []
        with open(self.logs / "audit.log") as log:
            for line in log:
                event = json.loads(line)
                if event.get("user", {}).get("username") == user:
                    events.append(event)
        return events

    def dump(self) -> str:
        """Every component's last log lines (for a failing test's report)."""
        return "\n\n".join(f"== {c.name} ({c.log})\n{c.tail(20)}" for c in self.components.values())


def _impersonation_headers(as_user: str | None, as_groups: list[str] | None) -> list[tuple[str, str]]:
    if as_user is None:
        if as_groups:
            raise ValueError("as_groups needs as_user")
        return []
    groups = list(as_groups or [])
    if as_user.startswith("system:serviceaccount:") and not groups:
        ns = as_user.split(":")[2]
        groups = ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"]
    elif not groups:
        groups = ["system:authenticated"]
    return [("Impersonate-User", as_user), *(("Impersonate-Group", g) for g in groups)]


def _run_client(
    cmd: list[str], env: dict[str, str], input: str | None, check: bool, timeout: float
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ControlPlaneError(
            f"`{' '.join(cmd[:1] + cmd[2:])}` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def start(
    *, base_dir: Path | None = None, timeout: float = 120.0, address: str = "127.0.0.1", kwok: bool = True
) -> ControlPlane:
    """Build/fetch the binaries if needed, start a cluster and return it once the node is Ready and the
    controllers work. On any failure everything started is stopped and ControlPlaneError (with the failing
    component's log tail) is raised.

    ``address``: where the API server listens and what it advertises (the real node, node.py, passes its
    bridge's address so pods reach it through the ``kubernetes`` Service). ``kwok=False``: no fake node and
    no kwok StorageClass (the real node brings its own kubelet and provisioner)."""
    bins = binaries.ensure_binaries()
    t0 = time.monotonic()
    cdir = Path(tempfile.mkdtemp(prefix="opd-k8s-", dir=base_dir))
    cp = ControlPlane(dir=cdir, binaries=bins)
    atexit.register(cp.stop)
    try:
        _start(cp, timeout, address, kwok)
    except BaseException:
        atexit.unregister(cp.stop)
        cp.stop(keep_dir=True)  # the error names a log file in it
        raise
    cp.startup_seconds = time.monotonic() - t0
    binaries.log(f"control plane up in {cp.startup_seconds:.1f}s: {cp.api_url} (dir {cp.dir})")
    return cp


def _start(cp: ControlPlane, timeout: float, address: str, kwok: bool) -> None:
    make_pki(cp.pki, extra_ips=() if address == "127.0.0.1" else (address,))
    pki = cp.pki
    etcd_port, etcd_peer, api_port = _free_port(), _free_port(), _free_port()
    cp.api_url = f"https://{address}:{api_port}"
    cp.kubeconfig.write_text(
        _kubeconfig(
            cp.api_url,
            pki / "ca.crt",
            {"client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")},
        )
    )

    etcd_url = f"http://127.0.0.1:{etcd_port}"
    cp._spawn(
        "etcd",
        [
            f"--data-dir={cp.dir / 'etcd'}",
            "--name=default",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
            "--quota-backend-bytes=2147483648",
        ],
    )

    def etcd_healthy() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", etcd_port, timeout=2)
        try:
            conn.request("GET", "/health")
            return b'"health":"true"' in conn.getresponse().read()
        finally:
            conn.close()

    cp.wait("etcd to be healthy", etcd_healthy, timeout=timeout, component="etcd")

    audit_policy = cp.dir / "audit-policy.yaml"
    audit_policy.write_text(AUDIT_POLICY)

    cp._spawn(
        "kube-apiserver",
        [
            f"--etcd-servers={etcd_url}",
            f"--bind-address={address}",
            f"--advertise-address={address}",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # PodSecurity is on by default; named here because the tests rely on it. OwnerReferencesPermission-
            # Enforcement (on in OpenShift) admits an ownerReference with blockOwnerDeletion only from a subject
            # that may update the owner's finalizers: the operator's RBAC must say so.
            "--enable-admission-plugins=NodeRestriction,PodSecurity,OwnerReferencesPermissionEnforcement",
            "--allow-privileged=true",  # privileged pods are refused by PodSecurity, not by this switch
            # The `kubernetes` Service cannot point at a loopback address; with kwok nothing dials it.
            *(["--endpoint-reconciler-type=none"] if address == "127.0.0.1" else []),
            # A real kubelet's name does not resolve: `kubectl logs/exec` reach it by its InternalIP.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            "--profiling=false",
            f"--audit-policy-file={audit_policy}",
            f"--audit-log-path={cp.logs / 'audit.log'}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",  # written before the response: a test reads it right after
            "--v=1",
        ],
    )
    cp.wait(
        "kube-apiserver /readyz",
        lambda: cp.get("/readyz", ok=(200,)) == "ok",
        timeout=timeout,
        component="kube-apiserver",
    )

    common = [f"--kubeconfig={cp.kubeconfig}", "--leader-elect=false", "--secure-port=0", "--v=1"]
    cp._spawn(
        "kube-controller-manager",
        [
            *common,
            "--controllers=*",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--use-service-account-credentials=false",
        ],
    )
    cp._spawn("kube-scheduler", common)
    if kwok:
        _start_kwok(cp, timeout)
    # The controller-manager is working once the default namespace's ServiceAccount exists.
    cp.wait(
        "the controller-manager (the default ServiceAccount)",
        lambda: (
            cp.get("/api/v1/namespaces/default/serviceaccounts/default", ok=(200, 404)).get("kind") == "ServiceAccount"
        ),
        timeout=timeout,
        component="kube-controller-manager",
    )


def _start_kwok(cp: ControlPlane, timeout: float) -> None:
    cp._spawn(
        "kwok",
        [
            f"--kubeconfig={cp.kubeconfig}",
            f"--config={STAGES}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.96.0.10",
        ],
    )

    cp.kubectl("apply", "-f", "-", input=NODE_AND_STORAGE)

    def node_ready() -> bool:
        node = cp.get(f"/api/v1/nodes/{NODE_NAME}")
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))

    cp.wait(f"node {NODE_NAME} to be Ready (kwok)", node_ready, timeout=timeout, component="kwok")
