"""The models the GPU check trains (random weights, real configs: no network) and what it measures."""

from __future__ import annotations

import gc
import resource
import shutil
from pathlib import Path

import torch

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak, per GPU

QWEN3_1_7B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151645,
    use_cache=True,
)
# Qwen3's shape at a size whose float32 CPU reference takes seconds: GQA (2 query heads per key/value
# head) and head_dim 128, as the real model has, so the GPU kernels that matter are the ones compared.
NUMERICS = dict(
    QWEN3_1_7B,
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    bos_token_id=1,
    eos_token_id=2,
)
TINY = dict(
    QWEN3_1_7B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
)


def write_model(config: dict, path: Path, dev: torch.device) -> Path:
    """Random-init weights with ``config`` in bf16 (what a hub checkpoint of Qwen3 holds), written once."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**config), dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    tmp.rename(path)
    return path


def n_params(model, trainable_only: bool = False) -> int:
    """Parameters counted once (tied weights once; an FSDP shard counts as its whole parameter)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.shape.numel()
    return total


def model_flops(params: int, config: dict, lengths: list[int]) -> float:
    """Training FLOPs of sequences of ``lengths`` tokens: 6 x parameters x tokens (forward + backward)
    plus causal attention, 6 x layers x heads x head_dim x sum(T^2) (half of two T x T matmuls, 2 FLOPs
    each, 3 passes). The gradient-checkpoint recompute is not counted, as MFU conventionally does not."""
    attention = 6 * config["num_hidden_layers"] * config["num_attention_heads"] * config["head_dim"]
    return 6.0 * params * sum(lengths) + attention * sum(t * t for t in lengths)


def peak_memory_gib(dev: torch.device) -> float:
    """Peak allocated accelerator memory since the last ``reset_peak``; on a CPU the process's peak RSS."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def release(dev: torch.device) -> None:
    """Free what the previous case left: under mixed precision its model is garbage only to the cycle
    collector (``precision.attach`` stores the model's own forward in an autocast wrapper on the model),
    so without a collection each case would keep the last one's float32 masters (6.4 GiB for
    Qwen3-1.7B) on the GPU; then return the cached blocks to the driver (the vLLM engine that follows
    measures free memory)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(dev: torch.device) -> None:
    """Start a case's peak from what is really live: the previous case released, the counter reset."""
    release(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
