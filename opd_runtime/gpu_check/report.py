"""What the GPU check writes for a reader who was not there: the machine and library versions, and every
check so far, rewritten after each part (a run stopped by its time limit still leaves what it had done)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# the libraries whose versions decide the paths the check runs (absent ones are reported as None)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "pydantic", "vllm")
NVIDIA_SMI_SECONDS = 20


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> str:
    try:
        proc = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=NVIDIA_SMI_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi: {type(err).__name__}: {err}"
    return proc.stdout + proc.stderr


def environment(dev: torch.device) -> dict:
    """Versions, the device's properties and the kernels torch has for it, and nvidia-smi's table."""
    env: dict = {
        "python": sys.version.split()[0],
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "environ": {
            k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "HF_HUB_OFFLINE")
        },
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 2),
            multiprocessors=props.multi_processor_count,
            nccl=".".join(map(str, torch.cuda.nccl.version())),
            cudnn=torch.backends.cudnn.version(),
            flash_sdpa_built=torch.backends.cuda.is_flash_attention_available(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            sdpa_gqa_kernels=_sdpa_kernels(dev),
            nvidia_smi=_nvidia_smi(),
        )
    return env


def _sdpa_kernels(dev: torch.device) -> dict:
    """Whether torch's flash and memory-efficient kernels accept the attention ``sdpa_varlen`` calls in
    training (bf16, Qwen3-1.7B's 16 query / 8 key-value heads of 128, causal, ``enable_gqa``); where
    neither does, sdpa falls back to its math kernel (a T x T matrix per head). ``debug`` prints the
    reasons a kernel refuses to stderr, into the log."""
    try:
        q = torch.zeros(1, 16, 256, 128, dtype=torch.bfloat16, device=dev)
        kv = torch.zeros(1, 8, 256, 128, dtype=torch.bfloat16, device=dev)
        params = torch.backends.cuda.SDPAParams(q, kv, kv, None, 0.0, True, True)
        return {
            "flash": torch.backends.cuda.can_use_flash_attention(params, debug=True),
            "efficient": torch.backends.cuda.can_use_efficient_attention(params, debug=True),
        }
    except Exception as err:  # a report, not a check: say why and carry on
        return {"error": f"{type(err).__name__}: {err}"}


def write(path: str | Path, dev: torch.device, world: int, env: dict, checks: list, *, complete: bool) -> None:
    """The JSON report, replaced atomically: ``complete`` false while parts remain (or when stopped)."""
    path = Path(path)
    body = {
        "complete": complete,
        "device": str(dev),
        "world": world,
        "torch": torch.__version__,
        "transformers": (env.get("packages") or {}).get("transformers"),
        "environment": env,
        "checks": [c.__dict__ for c in checks],
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=2, default=str))
    os.replace(tmp, path)
