"""bench/gpu_check.sh, the prepared GPU check, run here in its small shape (``--tiny``) on the CPU.

The script is meant for a GPU machine that this project may only get for minutes, so it must work the
first time: the same script and the same opd code paths (build_trainable, the SFT micro-batch loss, the
OPD ``train_on_samples``, the optimizer step) run here, on one process and on two (the launcher path,
FSDP over gloo), and the printed numbers are checked for sense.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "numbers.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", "--workdir", str(tmp_path), "--json", str(out)],
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def check_rows(numbers: dict, world: int) -> None:
    sft, opd = numbers["rows"]
    assert numbers["world"] == world
    assert sft["tokens"] == 256 * world and opd["tokens"] == 8 * 64 * world
    # the tiny shape: 2 layers x 2 heads x head_dim 32; SFT packs 4 traces of 64, OPD has 8 rows of 64
    params = numbers["params"]
    attention = 6 * 2 * 2 * 32
    assert sft["model_flops"] == pytest.approx(world * (6 * params * 256 + attention * 4 * 64**2))
    assert opd["model_flops"] == pytest.approx(world * (6 * params * 512 + attention * 8 * 64**2))
    for row in (sft, opd):
        assert row["tokens_per_second"] > 0 and row["peak_memory_gib"] > 0
        assert row["mfu"] is None  # no accelerator peak to divide by on a CPU


def test_gpu_check_runs_in_small_shape_on_one_process(tmp_path):
    proc, numbers = gpu_check(tmp_path)
    assert "no GPU, running on the CPU" in proc.stdout
    assert "strategy ddp" in proc.stdout and "tokens/s" in proc.stdout and "peak memory" in proc.stdout
    assert "vllm engines: skipped (no GPU)" in proc.stdout and numbers["vllm_engines"] is None
    check_rows(numbers, 1)


@pytest.mark.slow
def test_gpu_check_starts_one_process_per_device_under_the_launcher(tmp_path):
    proc, numbers = gpu_check(tmp_path, GPU_CHECK_NPROC="2")
    assert "2 processes, one per GPU (FSDP)" in proc.stdout
    assert "strategy fsdp" in proc.stdout
    check_rows(numbers, 2)
