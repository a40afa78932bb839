"""bench/gpu_check.sh, the GPU check, run here in its small shape (``--tiny``) on the CPU.

The check is meant for a GPU machine this project may get for minutes, once, so it must start the first
time: the same entry script and the same opd code paths run here, on one process and on two (the launcher
path, FSDP over gloo), with the main venv's python and - exactly as the lent machine runs it - with a
python holding that machine's torch and transformers and no pydantic, given the carried wheels folder.
A part that is asked for and cannot run must fail the command, never pass as skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"numerics", "collectives", "size", "vllm"}
# what runs in --tiny on a CPU: every check but the vLLM part, which needs a GPU
TINY_CHECKS = {
    ("numerics", "sft loss precision"),
    ("numerics", "opd loss precision"),
    ("numerics", "packed == unpacked"),
    ("numerics", "all-reduce"),
    ("numerics", "fsdp2 bf16 policy"),
    ("numerics", "dcp save/load"),
    ("numerics", "resume device"),
    ("size", "sft full 1 packed row x 256 tokens"),
    ("size", "sft full 1 packed row x 512 tokens"),
    ("size", "opd full 4 x 128 tokens"),
    ("size", "sft lora r8 1 packed row x 256 tokens"),
    ("size", "sft lora r8 1 packed row x 512 tokens"),
    ("size", "opd lora r8 4 x 128 tokens"),
}


def gpu_check(tmp_path: Path, *args: str, python: str = sys.executable, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args],
        env={**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )


def tiny(tmp_path: Path, python: str = sys.executable, **env) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "numbers.json"
    proc = gpu_check(tmp_path, "--tiny", "--workdir", str(tmp_path), "--json", str(out), python=python, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def check_tiny_run(proc: subprocess.CompletedProcess, numbers: dict, world: int) -> None:
    checks = {(c["part"], c["name"]): c for c in numbers["checks"]}
    assert set(checks) == TINY_CHECKS | {("vllm", "vllm beside the trainer")}, sorted(checks)
    for key in TINY_CHECKS:
        assert checks[key]["status"] == "passed", checks[key]
    assert checks["vllm", "vllm beside the trainer"]["status"] == "NOT CHECKED"
    assert numbers["world"] == world and numbers["device"] == "cpu"
    for part in PARTS:
        assert f"[{part}]" in proc.stdout
    assert f"{len(TINY_CHECKS)} passed, 0 failed, 1 not checked" in proc.stdout
    assert "Loading weights" not in proc.stdout + proc.stderr  # progress bars would bury the log's lines
    sft = checks["size", "sft full 1 packed row x 256 tokens"]["numbers"]
    # the tiny shape: 2 layers x 2 heads x head_dim 32; the row packs 4 traces of 64 tokens
    attention = 6 * 2 * 2 * 32
    assert sft["tokens"] == 256 * world
    assert sft["model_flops"] == pytest.approx(world * (6 * sft["params"] * 256 + attention * 4 * 64**2))
    assert sft["tokens_per_second"] > 0 and sft["peak_memory_gib"] > 0 and sft["mfu"] is None


def test_gpu_check_runs_every_part_in_small_shape_on_one_process(tmp_path):
    proc, numbers = tiny(tmp_path)
    assert "gpu_check: cpu x 1 (gloo)" in proc.stdout
    check_tiny_run(proc, numbers, 1)


@pytest.mark.parametrize(
    ("flag", "says"),
    [("--require-gpu", "no CUDA device is visible"), ("--require-vllm", "no GPU")],
)
def test_a_required_part_that_cannot_run_fails_the_command(tmp_path, flag, says):
    proc = gpu_check(tmp_path, "--tiny", flag)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert says in proc.stderr and "passed" not in proc.stdout


def test_a_python_without_torch_fails_at_once(tmp_path):
    proc = gpu_check(tmp_path, "--tiny", python="/usr/bin/false")
    assert proc.returncode == 2 and "cannot import torch and transformers" in proc.stderr


@pytest.mark.slow
def test_gpu_check_starts_one_process_per_device_under_the_launcher(tmp_path):
    proc, numbers = tiny(tmp_path, GPU_CHECK_NPROC="2")
    assert "2 processes, one per GPU" in proc.stdout and "cpu x 2 (gloo)" in proc.stdout
    check_tiny_run(proc, numbers, 2)


@pytest.mark.slow
def test_gpu_check_starts_with_the_lent_machines_libraries_and_the_carried_wheels(tmp_path):
    """The device command's way: the stand-in python (torch and transformers at pyproject's floors, the
    lent machine's versions, and no pydantic), the checkout not installed, pydantic from .gpu-wheels."""
    from support.floor_env import floor_venv

    python = floor_venv() / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import pydantic"], capture_output=True).returncode != 0
    subprocess.run(["bash", str(ROOT / "bench" / "gpu_wheels.sh")], check=True)
    proc, numbers = tiny(tmp_path, python=str(python))
    assert "pydantic from" in proc.stdout and ".gpu-wheels" in proc.stdout
    assert numbers["torch"].startswith("2.11.0") and numbers["transformers"] == "5.17.0"
    check_tiny_run(proc, numbers, 1)


def test_opd_gpu_check_is_the_same_check_for_cluster_users(tmp_path):
    """`opd gpu-check` (the runtime image's entry, run as a one-GPU Job) passes its options through to the
    check: a required GPU that is absent fails it with the check's own exit code."""
    proc = subprocess.run(
        [sys.executable, "-m", "opd_runtime", "gpu-check", "--tiny", "--require-gpu", "--workdir", str(tmp_path)],
        env={**os.environ, "PYTHONSAFEPATH": "1", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no CUDA device is visible" in proc.stderr


def test_the_process_gpu_is_named_by_index(monkeypatch):
    """``modeling.device()`` says ``cuda`` with no index, which ``torch.cuda.set_device`` refuses before it
    reaches the driver; the check and the stages pin ``cuda:LOCAL_RANK`` (``distributed.local_device``)."""
    import torch

    from opd_runtime.training.distributed import local_device

    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_device(torch.device("cuda"))  # what the check did before it pinned by index
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert local_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert local_device(torch.device("cpu")) == torch.device("cpu")


def run_check(tmp_path: Path, *args: str) -> subprocess.Popen:
    """``python -m opd_runtime.gpu_check`` itself (no wrapper script between it and a signal)."""
    return subprocess.Popen(
        [sys.executable, "-m", "opd_runtime.gpu_check", "--tiny", "--workdir", str(tmp_path), *args],
        env={**os.environ, "PYTHONSAFEPATH": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def test_a_failing_size_case_fails_alone_with_its_traceback_in_the_report(tmp_path):
    """One size case that raises (here the LoRA cases, given a rank the spec refuses) is FAILED with its
    traceback in the JSON, and every other case still runs and passes: on a GPU, one case out of memory
    must not hide the rest."""
    out = tmp_path / "report.json"
    proc = run_check(tmp_path, "--parts", "size", "--lora-rank", "-1", "--json", str(out))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stdout + stderr
    report = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert [n for n, s in status.items() if s == "passed"] == [n for n in status if " full " in n]
    lora = [c for c in report["checks"] if " lora " in c["name"]]
    assert len(lora) == 3 and all(c["status"] == "FAILED" for c in lora)
    assert all("Traceback" in c["traceback"] and "rank" in c["traceback"] for c in lora)
    assert report["complete"] is True and report["torch"].startswith(report["environment"]["packages"]["torch"])


def test_a_check_stopped_by_its_time_limit_leaves_its_report(tmp_path):
    """SIGTERM (the wrapper's ``timeout``) while a part runs: exit 124 and a report, marked incomplete,
    that names the part it stopped in."""
    import signal
    import time

    out = tmp_path / "report.json"
    proc = run_check(tmp_path, "--json", str(out))
    deadline = time.monotonic() + 300
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the report is first written just before the first part starts
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 124, stdout + stderr
    report = json.loads(out.read_text())
    assert report["complete"] is False
    stopped = report["checks"][-1]
    assert stopped["name"] == "stopped" and stopped["status"] == "FAILED" and stopped["part"] == "numerics"
    assert "stopped during numerics" in stdout


def test_each_case_starts_from_the_memory_the_previous_one_released():
    """Under mixed precision (every GPU run) a trained model is reclaimed only by the cycle collector
    (``precision.attach`` keeps the model's own forward in a wrapper on the model); ``reset_peak``, run
    before each size case, must collect it, or each case would carry the previous one's float32 masters."""
    import gc
    import weakref

    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from opd_runtime.gpu_check import shapes
    from opd_runtime.training.precision import Precision, attach

    gc.disable()  # an automatic collection in between would hide what is being tested
    try:
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shapes.TINY))
        attach(model, Precision(torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16), torch.device("cpu"))
        alive = weakref.ref(model)
        del model
        assert alive() is not None  # the cycle this is about
        shapes.reset_peak(torch.device("cpu"))
        assert alive() is None
    finally:
        gc.enable()
