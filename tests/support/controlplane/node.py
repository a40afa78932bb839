"""A real node for the test control plane: pods run in real containers on this machine.

``start()`` makes a control plane without kwok whose API server listens on the node bridge's address, then
starts beside it, in the same process group:

- containerd (Debian's, a private instance: its own root, state, socket and runc root under the node's
  directory; CRI with the cgroupfs driver, ``restrict_oom_score_adj`` because this VM's capability
  bounding set lacks CAP_SYS_RESOURCE, the sandbox image ``PAUSE_IMAGE`` built from Kubernetes' pause.c);
- kubelet (``failCgroupV1: false``, ``failSwapOn: false``, pods under their own cgroup root) and kube-proxy
  (iptables mode) from the control plane's Kubernetes source;
- Debian's CNI plugins: the bridge ``BRIDGE`` with ``POD_SUBNET``, host-local IPAM, portmap, loopback;
- CoreDNS serving ``cluster.local`` on the bridge's address (the kubelet's clusterDNS);
- rancher's local-path-provisioner, the default StorageClass ``STORAGE_CLASS`` (WaitForFirstConsumer):
  claims bind to a directory under the node's directory once a pod using them is scheduled.

Traffic stays on this machine: the bridge forwards only between its own pods (a FORWARD rule drops pod
traffic to anywhere else; no masquerading), and every address lives on the bridge or in pods' network
namespaces. ``RealNode.stop()`` (also run at exit, and when start fails) removes the pods, processes,
mounts, network namespaces, the bridge, the KUBE-* iptables chains, the cgroups and the directory.

Needs root and Debian's ``containerd runc containernetworking-plugins iptables conntrack busybox-static``
(``ensure_packages()`` installs them with apt-get where missing). ``python node.py`` builds and installs
what the node needs without starting it (``make test`` runs it before pytest).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import binaries, oci
from .cluster import ControlPlane, ControlPlaneError, _free_port, _kubeconfig, _openssl
from .cluster import start as start_control_plane

NODE_NAME = "opd-node-0"
BRIDGE = "opd-node0"
POD_SUBNET = "10.77.0.0/24"
GATEWAY = "10.77.0.1"  # the bridge's address: API server, kubelet, CoreDNS listen here
STORAGE_CLASS = "local-path"
PROVISIONER = "rancher.io/local-path"
PAUSE_IMAGE = f"opd.local/pause:{binaries.K8S_VERSION}"
BUSYBOX_IMAGE = "opd.local/busybox:static"
CGROUP_ROOT = "/opd-node"
FORWARD_CHAIN = "OPD-NODE-FORWARD"
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "busybox-static")
HOST_TOOLS = {
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "conntrack": "conntrack",
    "busybox": "busybox-static",
}
CNI_DIR = Path("/usr/lib/cni")
LOCK = Path("/run/lock/opd-real-node.lock")
NETNS_DIR = Path("/var/run/netns")


class NodeError(ControlPlaneError):
    pass


def _sh(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def ensure_packages() -> None:
    """Install the Debian packages the node uses where one of its tools is missing (root and apt-get)."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not (CNI_DIR / "bridge").is_file():
        missing.append("containernetworking-plugins")
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NodeError(
            f"the real node needs the Debian packages {' '.join(DEBIAN_PACKAGES)} (missing: {' '.join(missing)}); "
            "install them as root with apt-get"
        )
    binaries.log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NodeError(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def make_images(dest: Path) -> dict[str, Path]:
    """The node's own images as OCI archives: the pod sandbox (pause) and busybox (the provisioner's helper
    pods and the tests' small workloads), both from local static binaries."""
    pause = binaries.binary_path("pause")
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    applets = _sh(str(busybox), "--list").stdout.split()
    files: dict[str, Path | oci.Symlink] = {"/bin/busybox": busybox}
    files |= {f"/bin/{a}": oci.Symlink("busybox") for a in applets if a != "busybox"}
    return {
        PAUSE_IMAGE: oci.write_image(
            dest / "pause.tar", PAUSE_IMAGE, {"/pause": pause}, entrypoint=["/pause"], user="65535:65535"
        ),
        BUSYBOX_IMAGE: oci.write_image(dest / "busybox.tar", BUSYBOX_IMAGE, files, entrypoint=["/bin/sh"]),
    }


def image_store() -> Path:
    """containerd's root (content, snapshots, metadata): kept in the cache between nodes, so an image
    imported once (the runtime image unpacks to gigabytes) is there for every later node. Only one node
    runs at a time (``LOCK``); its state (sockets, tasks, mounts) stays under the node's own directory."""
    return binaries.cache_root() / "node" / "containerd"


def _containerd_config(d: Path) -> str:
    return f"""\
version = 2
root = "{image_store()}"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd/containerd.sock"
[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_DIR}"
    conf_dir = "{d}/cni/net.d"
"""


def _cni_config(d: Path) -> dict:
    return {
        "cniVersion": "0.4.0",
        "name": "opd-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "isDefaultGateway": True,  # Service addresses are routed through the host (kube-proxy)
                "ipMasq": False,  # pods never reach beyond this machine
                "hairpinMode": True,  # a pod reaches itself through its own Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": GATEWAY}]],
                    "dataDir": str(d / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _kubelet_config(d: Path, pki: Path, port: int) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": GATEWAY,
        "port": port,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "authentication": {
            "x509": {"clientCAFile": str(pki / "ca.crt")},
            "webhook": {"enabled": False},
            "anonymous": {"enabled": False},
        },
        "authorization": {"mode": "AlwaysAllow"},  # only the API server (admin certificate) authenticates
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": CGROUP_ROOT,
        "failCgroupV1": False,  # this VM mounts cgroup v1 (hybrid)
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{d}/containerd/containerd.sock",
        "clusterDNS": [GATEWAY],
        "clusterDomain": "cluster.local",
        "resolvConf": str(d / "resolv.conf"),
        "podLogsDir": str(d / "pod-logs"),
        "volumePluginDir": str(d / "volume-plugins"),
        "registerNode": True,
        "serializeImagePulls": False,
        # The test machine's disk and memory are shared: evict nothing for pressure, collect no images.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "nodeStatusReportFrequency": "10s",
    }


def _node_certificate(pki: Path) -> None:
    """The kubelet's client certificate: user system:node:<name> in system:nodes (Node authorizer)."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "node.key", cwd=pki)
    (pki / "node.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    )
    _openssl(
        "req",
        "-new",
        "-key",
        "node.key",
        "-subj",
        f"/O=system:nodes/CN=system:node:{NODE_NAME}",
        "-out",
        "node.csr",
        cwd=pki,
    )
    _openssl(
        "x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "30",
        "-extfile", "node.ext", "-out", "node.crt", cwd=pki,
    )  # fmt: skip


def _corefile(kubeconfig: Path, ready_port: int) -> str:
    """The cluster's DNS zone only: pods resolve Services and pods, and nothing else (no ``forward``: they
    need no names beyond the cluster). ``ready`` answers once the kubernetes plugin has synced."""
    return f"""\
.:53 {{
    bind {GATEWAY}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} opd-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""


def _storage_manifest(volumes: Path) -> list[dict]:
    ns = "local-path-storage"
    helper_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "helper-pod"},
        "spec": {
            "containers": [
                {
                    "name": "helper-pod",
                    "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "securityContext": {"runAsUser": 0},  # creates directories in the node's volume root
                }
            ]
        },
    }
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "local-path-provisioner", "namespace": ns}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "local-path-config", "namespace": ns},
            "data": {
                "config.json": json.dumps(
                    {"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [str(volumes)]}]}
                ),
                # 0777: pods run as arbitrary non-root users under PodSecurity restricted.
                "setup": '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
                "teardown": '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n',
                "helperPod.yaml": json.dumps(helper_pod),
            },
        },
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
        },
    ]


def _cgroup_hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies (every controller's, the named systemd one, a hybrid's unified one: the
    kubelet wants its cgroup root in all of them), or the v2 root."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root]
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.is_symlink()]


def _sysctl(path: str, value: str | None = None) -> str:
    f = Path("/proc/sys") / path
    old = f.read_text().strip()
    if value is not None:
        f.write_text(value)
    return old


@dataclass
class RealNode:
    """A control plane and its one real node; see the module docstring. ``start()`` makes one."""

    cp: ControlPlane | None = None
    dir: Path | None = None
    images: dict[str, Path] = field(default_factory=dict)
    startup_seconds: float = 0.0
    _undo: list[tuple[str, object]] = field(default_factory=list)
    _lock: object = None

    @property
    def socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    def ctr(self, *args: str, input_path: Path | None = None, timeout: float = 600) -> str:
        cmd = ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args]
        with open(input_path, "rb") if input_path else contextlib.nullcontext() as stdin:  # type: ignore[attr-defined]
            proc = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise NodeError(f"`{' '.join(cmd)}` failed: {proc.stdout.decode()}{proc.stderr.decode()}")
        return proc.stdout.decode()

    def load_image(self, archive: Path) -> None:
        """Import an image archive (OCI layout or ``docker save``) into the node; pods use it with
        ``imagePullPolicy: Never`` or ``IfNotPresent`` (the node pulls from nowhere)."""
        self.ctr("images", "import", "-", input_path=archive)

    def image_digests(self) -> dict[str, str]:
        """Each image name in the node's store and the digest of the manifest it names."""
        lines = self.ctr("images", "list").splitlines()[1:]  # REF TYPE DIGEST SIZE PLATFORMS LABELS
        return {line.split()[0]: line.split()[2] for line in lines if line.strip()}

    def load_docker_image(self, tag: str, timeout: float = 1800) -> float:
        """Copy a Docker engine's image ``tag`` (``repo:tag``) into the node (``docker save | ctr import``),
        unless the node's store (``image_store()``, kept between nodes) has it already; other tags of
        the same repository are removed first, so the store holds one version of each image. Returns
        the seconds the import took (0 when the image was there)."""
        name = tag if "/" in tag else f"docker.io/library/{tag}"  # how containerd names an unqualified ref
        digests = self.image_digests()
        if name in digests:
            return 0.0
        repo = name.rsplit(":", 1)[0]
        # an import names the image by its ID too: every name of a replaced image's manifest goes
        old = {d for n, d in digests.items() if n.rsplit(":", 1)[0] == repo}
        stale = sorted(n for n, d in digests.items() if d in old)
        if stale:
            self.ctr("images", "remove", "--sync", *stale)
        t0 = time.monotonic()
        cmd = ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", "images", "import", "-"]
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            imp = subprocess.run(cmd, stdin=save.stdout, capture_output=True, timeout=timeout)
        finally:
            save.stdout.close()  # type: ignore[union-attr]
            save_err = save.stderr.read().decode()  # type: ignore[union-attr]
            save.wait()
        if save.returncode != 0 or imp.returncode != 0:
            out = imp.stdout.decode() + imp.stderr.decode()
            raise NodeError(f"`docker save {tag} | ctr import` failed: {save_err}{out}")
        seconds = time.monotonic() - t0
        binaries.log(f"imported {tag} into the node's image store in {seconds:.0f}s")
        return seconds

    def _forget_containers(self) -> None:
        """Remove every container (pod sandboxes too) from containerd's metadata, with its snapshot: the
        image store outlives the node, its containers must not."""
        ids = self.ctr("containers", "list", "--quiet", timeout=60).split()
        if ids:
            self.ctr("containers", "delete", *ids, timeout=120)

    # ---- teardown ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Remove everything the node made; each step runs even if an earlier one fails."""
        errors: list[str] = []

        def step(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except Exception as err:  # teardown goes on; the errors are reported together
                errors.append(f"{what}: {err}")

        if self.cp is not None:
            step("remove pods", self._remove_pods)
            if "containerd" in self.cp.components and self.cp.components["containerd"].proc.poll() is None:
                step("forget containers", self._forget_containers)
            step("stop processes", self.cp.stop, True)
        step("kill pod processes", self._kill_cgroup_processes)
        if self.dir is not None:
            step("kill containerd shims", self._kill_shims)
        for what, arg in reversed(self._undo):
            step(what, getattr(self, f"_undo_{what}"), arg)
        self._undo.clear()
        if self.dir is not None:
            step("unmount", self._unmount)
        step("remove cgroups", self._remove_cgroups)
        if self.cp is not None and os.environ.get("OPD_KEEP_CLUSTER") != "1":
            shutil.rmtree(self.cp.dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.truncate(0)  # type: ignore[attr-defined]  # nothing left for the next start to clean
            self._lock.close()  # type: ignore[attr-defined]
            self._lock = None
        if errors:
            raise NodeError("real node teardown: " + "; ".join(errors))

    def _remove_pods(self) -> None:
        """Let the kubelet tear pods down (CNI DEL removes their network namespaces and veths): no
        controllers or scheduler re-create them meanwhile."""
        assert self.cp is not None
        if "kubelet" not in self.cp.components or self.cp.components["kubelet"].proc.poll() is not None:
            return
        for name in ("kube-controller-manager", "kube-scheduler"):
            comp = self.cp.components.get(name)
            if comp and comp.proc.poll() is None:
                comp.proc.kill()
                comp.proc.wait()
        self.cp.kubectl(
            "delete", "pods", "--all", "--all-namespaces", "--grace-period=0", "--force", "--wait=false", check=False
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(NodeError, subprocess.TimeoutExpired):
                if "RUNNING" not in self.ctr("tasks", "list", timeout=10):
                    return
            time.sleep(0.5)

    def _pid_cmdlines(self) -> dict[int, str]:
        out = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return out

    def _kill_cgroup_processes(self) -> None:
        for hierarchy in _cgroup_hierarchies():
            root = hierarchy / CGROUP_ROOT.lstrip("/")
            if not root.is_dir():
                continue
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    for pid in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)

    def _kill_shims(self) -> None:
        marker = str(self.socket)
        for pid, cmd in self._pid_cmdlines().items():
            if "containerd-shim" in cmd and marker in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _unmount(self) -> None:
        """Unmount what the kubelet and containerd left under the node's directory, deepest first."""
        prefix = str(self.dir)
        for _ in range(3):
            points = []
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                point = line.split()[4].replace("\\040", " ")
                if point == prefix or point.startswith(prefix + "/"):
                    points.append(point)
            if not points:
                return
            for point in sorted(points, key=len, reverse=True):
                if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True)
        raise NodeError(f"mounts left under {prefix}")

    def _remove_cgroups(self) -> None:
        for hierarchy in _cgroup_hierarchies():
            root = hierarchy / CGROUP_ROOT.lstrip("/")
            if root.is_dir():
                for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    root.rmdir()

    # each _undo_<what> reverses one host change recorded in self._undo, in reverse order
    def _undo_bridge(self, _: object) -> None:
        _sh("ip", "link", "delete", BRIDGE, check=False)

    def _undo_sysctl(self, saved: object) -> None:
        path, value = saved  # type: ignore[misc]
        _sysctl(path, value)

    def _undo_forward(self, _: object) -> None:
        while _sh("iptables", "-w", "-D", "FORWARD", "-j", FORWARD_CHAIN, check=False).returncode == 0:
            pass
        _sh("iptables", "-w", "-F", FORWARD_CHAIN, check=False)
        _sh("iptables", "-w", "-X", FORWARD_CHAIN, check=False)

    def _undo_docker_user(self, _: object) -> None:
        while (
            _sh(
                "iptables", "-w", "-D", "DOCKER-USER", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT", check=False
            ).returncode
            == 0
        ):
            pass

    def _undo_netns(self, before: object) -> None:
        """Network namespaces containerd made and did not remove (a pod the kubelet could not tear down)."""
        if NETNS_DIR.is_dir():
            for ns in NETNS_DIR.iterdir():
                if ns.name not in before:  # type: ignore[operator]
                    subprocess.run(["umount", str(ns)], capture_output=True)
                    with contextlib.suppress(OSError):
                        ns.unlink()

    def _undo_kube_chains(self, _: object) -> None:
        """The KUBE-* chains kube-proxy and the kubelet made, in every table: the jumps to them, then them."""
        if self.cp is not None and "kube-proxy" in self.cp.binaries:
            subprocess.run([str(self.cp.binaries["kube-proxy"]), "--cleanup"], capture_output=True, timeout=60)
        for table in ("filter", "nat", "mangle"):
            rules = _sh("iptables", "-w", "-t", table, "-S", check=False).stdout.splitlines()
            for rule in rules:
                parts = rule.split()
                jumps_to_kube = "-j" in parts and parts[parts.index("-j") + 1].startswith("KUBE-")
                if parts[:1] == ["-A"] and not parts[1].startswith("KUBE-") and jumps_to_kube:
                    _sh("iptables", "-w", "-t", table, "-D", *parts[1:], check=False)
            chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
            for chain in chains:
                _sh("iptables", "-w", "-t", table, "-F", chain, check=False)
            for chain in chains:
                _sh("iptables", "-w", "-t", table, "-X", chain, check=False)


def leftovers(node: RealNode) -> list[str]:
    """What a stopped node left on the machine (empty when its teardown was complete)."""
    found = []
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        found.append(f"bridge {BRIDGE}")
    for table in ("filter", "nat", "mangle"):
        rules = _sh("iptables", "-w", "-t", table, "-S", check=False).stdout.splitlines()
        found += [f"iptables -t {table}: {r}" for r in rules if "KUBE-" in r or FORWARD_CHAIN in r or BRIDGE in r]
    if node.dir is not None:
        prefix = str(node.dir)
        found += [f"mount {m}" for m in Path("/proc/self/mountinfo").read_text().split() if m.startswith(prefix)]
        found += [f"process {pid}: {cmd}" for pid, cmd in node._pid_cmdlines().items() if prefix in cmd]
    found += [
        f"cgroup {h / CGROUP_ROOT.lstrip('/')}" for h in _cgroup_hierarchies() if (h / CGROUP_ROOT.lstrip("/")).exists()
    ]
    return found


def start(*, timeout: float = 180.0) -> RealNode:
    """Start a control plane and one real node; return once the node is Ready, CoreDNS answers and the
    StorageClass exists. On failure everything started is removed and NodeError is raised."""
    if os.geteuid() != 0:
        raise NodeError("the real node needs root (containerd, kubelet, bridge networking, iptables)")
    ensure_packages()
    bins = binaries.ensure_node_binaries()
    t0 = time.monotonic()
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK, "a+")  # noqa: SIM115 -- held for the node's lifetime; names its directory
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise NodeError(f"another real node runs on this machine (it holds {LOCK}); one at a time") from None
            time.sleep(1)
    _clean_stale(lock)
    node = RealNode(_lock=lock)
    atexit.register(_stop_quietly, node)
    try:
        _host_network(node)
        node.cp = start_control_plane(address=GATEWAY, kwok=False, timeout=timeout)
        atexit.unregister(node.cp.stop)  # the node's stop() stops it, after the pods
        node.dir = node.cp.dir / "node"
        lock.seek(0)
        lock.truncate()
        lock.write(str(node.dir))
        lock.flush()
        node.cp.binaries.update(bins)
        node.cp.binaries["containerd"] = Path(shutil.which("containerd") or "containerd")
        _start_node(node, timeout)
    except BaseException:
        atexit.unregister(_stop_quietly)
        with contextlib.suppress(NodeError):
            _stop_keeping_logs(node)
        raise
    node.startup_seconds = time.monotonic() - t0
    binaries.log(f"real node {NODE_NAME} Ready in {node.startup_seconds:.1f}s (dir {node.cp.dir})")
    return node


def _clean_stale(lock) -> None:
    """Remove what a node killed before its teardown (SIGKILL, power loss) left: the lock file names its
    directory; the bridge, chains, namespaces and cgroups have fixed names."""
    lock.seek(0)
    previous = lock.read().strip()
    stale = RealNode(dir=Path(previous) if previous else None)
    stale._kill_cgroup_processes()  # first: a surviving pod sandbox would keep its namespace "in use"
    stale._undo = [("netns", _netns_names_in_use()), ("bridge", None), ("kube_chains", None), ("forward", None)]
    if _sh("iptables", "-w", "-S", "DOCKER-USER", check=False).returncode == 0:
        stale._undo.append(("docker_user", None))
    with contextlib.suppress(NodeError):
        stale.stop()
    if previous:
        shutil.rmtree(Path(previous).parent, ignore_errors=True)
    lock.seek(0)
    lock.truncate()


def _netns_names_in_use() -> set[str]:
    """Network namespaces under NETNS_DIR that some process still uses (a live pod of another runtime)."""
    names = set()
    if NETNS_DIR.is_dir():
        for pid in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if pid.name.isdigit():
                    target = os.readlink(pid / "ns" / "net")
                    names.add(target)
    keep = set()
    for ns in NETNS_DIR.iterdir() if NETNS_DIR.is_dir() else []:
        with contextlib.suppress(OSError):
            if f"net:[{ns.stat().st_ino}]" in names:
                keep.add(ns.name)
    return keep


def _stop_quietly(node: RealNode) -> None:
    with contextlib.suppress(Exception):
        node.stop()


def _stop_keeping_logs(node: RealNode) -> None:
    """Stop after a failed start, keeping the logs the error names (the rest of the directory goes)."""
    os.environ["OPD_KEEP_CLUSTER"] = "1"
    try:
        node.stop()
    finally:
        del os.environ["OPD_KEEP_CLUSTER"]
        if node.cp is not None and os.environ.get("OPD_KEEP_CLUSTER") != "1":
            for sub in ("node", "etcd"):
                shutil.rmtree(node.cp.dir / sub, ignore_errors=True)


def _host_network(node: RealNode) -> None:
    """The bridge with its address (the API server binds to it before any pod exists), forwarding on,
    bridged traffic through iptables (a Service's backend on the same bridge answers through conntrack),
    and the FORWARD rule that keeps pod traffic on the bridge."""
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        _sh("ip", "link", "delete", BRIDGE)  # left by a killed run; the lock says none is running
    node._undo.append(("netns", {p.name for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()))
    _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    node._undo.append(("bridge", None))
    _sh("ip", "addr", "add", f"{GATEWAY}/{POD_SUBNET.split('/')[1]}", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    for path in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        if not (Path("/proc/sys") / path).exists():
            _sh("modprobe", "br_netfilter", check=False)
        node._undo.append(("sysctl", (path, _sysctl(path, "1"))))
    node._undo.append(("kube_chains", None))
    node._undo.append(("forward", None))
    node._undo_forward(None)  # a killed run's chain
    _sh("iptables", "-w", "-N", FORWARD_CHAIN)
    _sh("iptables", "-w", "-A", FORWARD_CHAIN, "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")
    _sh("iptables", "-w", "-A", FORWARD_CHAIN, "-i", BRIDGE, "-j", "DROP")
    _sh("iptables", "-w", "-A", FORWARD_CHAIN, "-o", BRIDGE, "-j", "DROP")
    _sh("iptables", "-w", "-I", "FORWARD", "1", "-j", FORWARD_CHAIN)
    # Docker's FORWARD policy is DROP and it may put its own chains first when it (re)starts.
    if _sh("iptables", "-w", "-S", "DOCKER-USER", check=False).returncode == 0:
        node._undo.append(("docker_user", None))
        _sh("iptables", "-w", "-I", "DOCKER-USER", "1", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")


def _start_node(node: RealNode, timeout: float) -> None:
    cp, d = node.cp, node.dir
    assert cp is not None and d is not None
    for sub in ("containerd", "cni/net.d", "kubelet", "pod-logs", "volume-plugins", "volumes", "images", "runc"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "resolv.conf").write_text("")  # pods get the cluster DNS and no host resolver
    (d / "containerd" / "config.toml").write_text(_containerd_config(d))
    (d / "cni" / "net.d" / "10-opd-node.conflist").write_text(json.dumps(_cni_config(d), indent=2))
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / CGROUP_ROOT.lstrip("/")
        root.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset takes no task until these are set
            if (root / f).exists() and not (root / f).read_text().strip():
                (root / f).write_text((hierarchy / f).read_text())

    image_store().mkdir(parents=True, exist_ok=True)
    _start_containerd(node, timeout)
    if node.ctr("containers", "list", "--quiet").split():
        # a node killed before its teardown left containers in the kept store: drop them and restart, so
        # the CRI plugin (which reads them once, at start) begins empty
        node._forget_containers()
        comp = cp.components.pop("containerd")
        comp.proc.terminate()
        comp.proc.wait(timeout=60)
        node.socket.unlink(missing_ok=True)
        _start_containerd(node, timeout)
    node.images = make_images(d / "images")
    cp.wait("containerd to import images", lambda: _try_import(node), timeout=timeout, component="containerd")

    pki = cp.pki
    _node_certificate(pki)
    node_kubeconfig = cp.dir / "node.kubeconfig"
    node_kubeconfig.write_text(
        _kubeconfig(
            cp.api_url,
            pki / "ca.crt",
            {"client-certificate": str(pki / "node.crt"), "client-key": str(pki / "node.key")},
        )
    )
    kubelet_port = _free_port()
    (d / "kubelet-config.json").write_text(json.dumps(_kubelet_config(d, pki, kubelet_port), indent=2))
    cp._spawn(
        "kubelet",
        [
            f"--config={d / 'kubelet-config.json'}",
            f"--kubeconfig={node_kubeconfig}",
            f"--root-dir={d / 'kubelet'}",
            f"--cert-dir={d / 'kubelet' / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={GATEWAY}",
            "--v=1",
        ],
    )
    cp._spawn(
        "kube-proxy",
        [
            f"--kubeconfig={cp.kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables",
            f"--cluster-cidr={POD_SUBNET}",
            f"--nodeport-addresses={GATEWAY}/32",
            f"--metrics-bind-address=127.0.0.1:{_free_port()}",
            f"--healthz-bind-address=127.0.0.1:{_free_port()}",
            # Leave the host's conntrack sysctls alone (kube-proxy would raise them machine-wide).
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            "--v=1",
        ],
    )
    dns_ready_port = _free_port()
    (d / "Corefile").write_text(_corefile(cp.kubeconfig, dns_ready_port))
    cp._spawn("coredns", ["-conf", str(d / "Corefile")])

    def node_ready() -> bool:
        got = cp.get(f"/api/v1/nodes/{NODE_NAME}", ok=(200, 404))
        conds = got.get("status", {}).get("conditions", []) if got.get("kind") == "Node" else []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    cp.wait(f"node {NODE_NAME} to be Ready (kubelet)", node_ready, timeout=timeout, component="kubelet")
    cp.wait(
        "CoreDNS to be ready",
        lambda: _http_ok(f"http://127.0.0.1:{dns_ready_port}/ready"),
        timeout=timeout,
        component="coredns",
    )

    cp.apply(_storage_manifest(d / "volumes"))
    cp._spawn(
        "local-path-provisioner",
        [
            "start",
            f"--kubeconfig={cp.kubeconfig}",
            f"--provisioner-name={PROVISIONER}",
            "--namespace=local-path-storage",
            "--configmap-name=local-path-config",
            "--service-account-name=local-path-provisioner",
            f"--helper-image={BUSYBOX_IMAGE}",
        ],
    )


def _http_ok(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200
    return False


def _start_containerd(node: RealNode, timeout: float) -> None:
    cp, d = node.cp, node.dir
    assert cp is not None and d is not None
    cp._spawn("containerd", ["--config", str(d / "containerd" / "config.toml"), "--log-level", "warn"])
    cp.wait("containerd's socket", node.socket.exists, timeout=timeout, component="containerd")
    cp.wait("containerd to answer", lambda: _answers(node), timeout=timeout, component="containerd")


def _answers(node: RealNode) -> bool:
    with contextlib.suppress(NodeError, subprocess.TimeoutExpired):
        node.ctr("version", timeout=10)
        return True
    return False


def _try_import(node: RealNode) -> bool:
    for archive in node.images.values():
        node.load_image(archive)
    return True


def main() -> int:
    """Prepare what a real node needs (packages, binaries) without starting one; ``--start`` also starts
    one, prints how long that took, and removes it."""
    t0 = time.monotonic()
    if os.geteuid() == 0:
        ensure_packages()
    for component, path in binaries.ensure_node_binaries().items():
        print(f"{component:24} {binaries.VERSIONS[component]:8} {path}")
    binaries.log(f"real-node binaries ready in {time.monotonic() - t0:.1f}s")
    if "--start" in sys.argv[1:]:
        node = start()
        print(node.cp.kubectl("get", "nodes", "-o", "wide").stdout)
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
