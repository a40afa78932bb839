"""The chunked loss head of a full fine-tune: float32 head vs the head under bf16 mixed precision.

    .venv/bin/python bench/head.py [--tokens 1024 --hidden 1024 --vocab 32768 --repeats 3]

One forward and backward of ``chunked.token_terms`` (log-probs and entropy, ``CHUNK_TOKENS`` per chunk)
on a one-layer Qwen3 whose weights are float32 masters: once as a float32 run computes it, once after
``precision.attach`` with bf16 compute, where the head's matrix multiplies take bf16 operands and the
log-softmax stays float32. Prints a side-by-side table: the best wall time of ``--repeats`` alternating
runs, and how far the bf16 head's log-probs and gradients are from the float32 head's. bf16 matrix
multiplies are only faster on a CPU with bf16 instructions (``avx512_bf16`` or ``amx_bf16`` in
/proc/cpuinfo); the table says which this one has.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_runtime.training import chunked
from opd_runtime.training.precision import Precision, attach

MIXED_BF16 = Precision(master=torch.float32, frozen=torch.bfloat16, compute=torch.bfloat16, export=torch.bfloat16)


def cpu_bf16_flags() -> str:
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) or "none"


def model(hidden: int, vocab: int, precision: Precision | None):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=False,
    )
    m = Qwen3ForCausalLM(config).float()
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 1 / hidden**0.5)
    return m if precision is None else attach(m, precision, torch.device("cpu"))


def step(m, hidden_ND, targets_N):
    """One forward and backward of the head; (seconds, log-probs, hidden's gradient, weight's gradient)."""
    head = chunked.output_head(m)
    head.weight.grad = None
    hidden = hidden_ND.clone().requires_grad_(True)
    start = time.perf_counter()
    terms = chunked.token_terms(hidden, head, targets_N, entropy=True)
    terms.logprobs_N.sum().backward()
    seconds = time.perf_counter() - start
    return seconds, terms.logprobs_N.detach(), hidden.grad, head.weight.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(1)
    hidden_ND = torch.randn(args.tokens, args.hidden, generator=gen)
    targets_N = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    heads = {
        "float32 head": model(args.hidden, args.vocab, None),
        "bf16 head": model(args.hidden, args.vocab, MIXED_BF16),
    }
    best = dict.fromkeys(heads, float("inf"))
    results = {}
    for _ in range(args.repeats):  # alternating, so a change in the machine's load hits both alike
        for name, m in heads.items():
            seconds, *results[name] = step(m, hidden_ND, targets_N)
            best[name] = min(best[name], seconds)
    ref_lp, ref_gh, ref_gw = results["float32 head"]
    flops = 4 * 2 * args.tokens * args.hidden * args.vocab  # forward, recompute, two backward products
    print(
        f"chunked head, {args.tokens} tokens x hidden {args.hidden} x vocabulary {args.vocab}, "
        f"{chunked.CHUNK_TOKENS} per chunk, {torch.get_num_threads()} threads; CPU bf16 instructions: "
        f"{cpu_bf16_flags()}; best of {args.repeats}\n"
    )
    print("| head | fwd+bwd s | head GFLOP/s | max abs log-prob diff | hidden grad rel. err | weight grad rel. err |")
    print("|---|---|---|---|---|---|")
    for name in heads:
        lp, gh, gw = results[name]
        print(
            f"| {name} | {best[name]:.2f} | {flops / best[name] / 1e9:.0f} | {(lp - ref_lp).abs().max():.2e} | "
            f"{((gh - ref_gh).norm() / ref_gh.norm()):.2e} | {((gw - ref_gw).norm() / ref_gw.norm()):.2e} |"
        )
    print(f"\nbf16 head / float32 head: {best['bf16 head'] / best['float32 head']:.2f}x the time")


if __name__ == "__main__":
    main()
