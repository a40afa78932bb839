"""The operator and runtime-cpu images, built from images/*/Dockerfile with a real Docker engine
(tests/support/controlplane/images.py: the engine, a base image and the builds, cached by the hash of their
inputs) and run: the operator's command as the image's non-root user, `opd validate` of the example run
and CPU torch inside the runtime image."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from support.controlplane import images

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    return images.ensure_images()


def docker_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "run", "--rm", *args], capture_output=True, text=True, timeout=timeout)


def test_the_operator_image_runs_its_command_as_a_non_root_user(built):
    tag = built["operator"]
    user = images.docker("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip()
    assert user == "10001"
    proc = docker_run(tag, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    # The uid a restricted pod would pick, not the image's own user: nothing needs a home or a name.
    proc = docker_run("--user", "20002:20002", "--read-only", "--tmpfs", "/tmp", tag, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = docker_run("--entrypoint", "python", tag, "-c", "import opd_operator.handlers, kopf; import torch")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


def validate_the_example(tag: str) -> subprocess.CompletedProcess[str]:
    """`opd validate` of examples/tiny-math.yaml inside image ``tag``, with no network."""
    proc = docker_run(
        "--network", "none", "-v", f"{ROOT / 'examples'}:/examples:ro", tag,
        "opd", "validate", "--config", "/examples/tiny-math.yaml",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_the_runtime_cpu_image_validates_the_example_run(built):
    tag = built["runtime-cpu"]
    proc = validate_the_example(tag)
    assert "valid DistillationRun 'tiny-math'" in proc.stdout


def test_the_runtime_cpu_image_runs_torch_on_cpu_with_the_makefiles_torch(built):
    """PyPI's torch (its CUDA build) computes on CPU in a container without a GPU; vLLM's CPU build and
    transformers import beside it."""
    tag = built["runtime-cpu"]
    code = (
        "import torch, transformers, vllm; x = torch.arange(6.0).reshape(2, 3); "
        "print(torch.__version__, (x @ x.T).tolist(), torch.cuda.is_available())"
    )
    proc = docker_run("--network", "none", tag, "python3", "-c", code, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (torch_version,) = re.findall(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    version, rest = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert version.split("+")[0] == torch_version
    assert rest == "[[5.0, 14.0], [14.0, 50.0]] False"


@pytest.mark.gpu_image
def test_the_runtime_gpu_dockerfile_builds_on_a_stand_in_with_the_vllm_images_layout(built):
    """The GPU image's own base is out of reach here; its RUN steps run on a stand-in with the same Python
    layout (system-wide python3 with torch, vllm, transformers, tokenizers; uv on PATH; the guard against
    the shadowed stdlib `operator` unset), and the image it makes runs `opd` as its user."""
    stand_in = images.gpu_stand_in(built["runtime-cpu"])
    tag = images.build_image("runtime-gpu", stand_in)
    user = images.docker("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip()
    assert user == "10001"
    validate_the_example(tag)
    code = "from importlib.metadata import version; print(version('vllm'), version('opd'))"
    proc = docker_run("--network", "none", tag, "python3", "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vllm_version = images.docker("run", "--rm", stand_in, "python3", "-c", code.replace(", version('opd')", ""))
    assert proc.stdout.split()[0] == vllm_version.stdout.strip(), "the install moved the base's vLLM"
