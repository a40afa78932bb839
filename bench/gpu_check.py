"""One SFT step and one OPD train step of a random-init Qwen3-1.7B through opd's own training code.

Run by ``bench/gpu_check.sh`` (which also starts one process per visible GPU under the launcher). No
network: the model is built here from Qwen3-1.7B's published config (random weights), written once to a
local folder and loaded by ``model_setup.build_trainable`` exactly as the stages load a student (float32
masters, bf16 compute, FSDP when several processes, gradient checkpointing, the attention the stages pick).

- SFT: one packed row of ``--sft-tokens`` tokens (4 traces), ``sft.trainer.micro_batch_nll`` + backward
  + ``loop.optimizer_step``;
- OPD: ``--opd-samples`` samples of ``--opd-tokens`` tokens (prompt + completion) with teacher log-probs
  given, ``distill.learner.train_on_samples`` (importance-sampling loss) + ``loop.optimizer_step``.

Each rank runs these shapes (weak scaling over processes). Printed per step: wall time, tokens/s over
all ranks, peak accelerator memory (CPU: peak resident memory) and MFU = model FLOPs / time / peak,
with model FLOPs = 6 x parameters x tokens + causal attention 6 x layers x heads x head_dim x sum(T^2)
(training = 3 forward passes; the gradient-checkpoint recompute is not counted, as MFU conventionally
does not). ``--tiny`` runs the same code on a small shape, on the CPU as well.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_FLOPS = {"bf16": 989e12}  # H100/H200 SXM dense bf16 tensor-core peak, per GPU

QWEN3_1_7B = dict(
    architectures=["Qwen3ForCausalLM"],
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (runs on a CPU in seconds)")
    p.add_argument("--sft-tokens", type=int, default=None, help="tokens of the packed SFT row (16384)")
    p.add_argument("--opd-samples", type=int, default=8)
    p.add_argument("--opd-tokens", type=int, default=None, help="tokens per OPD sample (8192)")
    p.add_argument("--opd-micro-batch", type=int, default=8, help="OPD samples per forward/backward")
    p.add_argument("--gradient-checkpointing", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the random model is written (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the numbers here (rank 0)")
    p.add_argument("--vllm", type=int, default=1, help="1: start each rank's vLLM engine and check its GPU")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="GPU memory share of each rank's engine")
    args = p.parse_args(argv)
    args.sft_tokens = args.sft_tokens or (256 if args.tiny else 16384)
    args.opd_tokens = args.opd_tokens or (64 if args.tiny else 8192)
    return args


def write_model(config: dict, path: Path) -> None:
    """Random-init weights with the config, in bf16 (what a hub checkpoint of Qwen3 holds)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    if (path / "config.json").exists():
        return
    cfg = Qwen3Config(**{k: v for k, v in config.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    tmp.rename(path)


def n_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # tied weights once; FSDP shards count as the whole parameter
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() if not hasattr(p, "full_tensor") else p.shape.numel()
    return total


def model_flops(params: int, config: dict, lengths: list[int]) -> float:
    attn = (
        6
        * config["num_hidden_layers"]
        * config["num_attention_heads"]
        * config["head_dim"]
        * sum(t * t for t in lengths)
    )  # causal: half of 2 matmuls x 2 FLOPs x 3 passes
    return 6.0 * params * sum(lengths) + attn


def peak_memory_gib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def vllm_placement(model_dir: Path, dev: torch.device, memory_utilization: float, say) -> dict | None:
    """Each rank starts the in-process vLLM engine the OPD sampler uses (``vllm_sampler.start_engine``,
    beside the trainer's state) and samples from it; the engine must run on the rank's own GPU: the one
    its trainer uses, a different one on every rank. ``None`` where there is no GPU or no vLLM."""
    import torch.distributed as dist

    from opd_runtime.training import distributed

    if dev.type != "cuda":
        say("vllm engines: skipped (no GPU)")
        return None
    try:
        import vllm  # noqa: F401
    except ImportError:
        say("vllm engines: skipped (vLLM is not installed)")
        return None
    from opd_runtime.vllm_sampler import engine_sample, shutdown_engine, start_engine

    torch.cuda.empty_cache()  # what the training steps freed, so the engine finds it
    t = time.perf_counter()
    llm = start_engine(
        str(model_dir),
        dtype="bfloat16",
        gpu_memory_utilization=memory_utilization,
        max_model_len=4096,
        sync_extension=True,
        enforce_eager=True,  # no CUDA-graph capture: placement is checked, not speed
    )
    started = time.perf_counter() - t
    engine_gpu = llm.collective_rpc("opd_device_uuid")[0]
    trainer_gpu = str(torch.cuda.get_device_properties(dev).uuid)
    samples = engine_sample(llm, [[5] * 16], stop_ids=[], n=2, max_new_tokens=16, seed=distributed.rank())
    shutdown_engine(llm)
    mine = {"rank": distributed.rank(), "trainer_gpu": trainer_gpu, "engine_gpu": engine_gpu}
    everyone = [mine]
    if distributed.active():
        everyone = [None] * distributed.world_size()
        dist.all_gather_object(everyone, mine)
    engines = [r["engine_gpu"] for r in everyone]
    ok = all(r["engine_gpu"] == r["trainer_gpu"] for r in everyone) and len(set(engines)) == len(engines)
    for r in everyone:
        same = r["engine_gpu"] == r["trainer_gpu"]
        where = "its trainer's GPU" if same else f"NOT its trainer's GPU {r['trainer_gpu']}"
        say(f"vllm engine of rank {r['rank']}: GPU {r['engine_gpu']} ({where})")
    say(
        f"vllm engines: {'each rank on its own GPU' if ok else 'PLACEMENT WRONG'}; rank 0's engine started in "
        f"{started:.0f}s and sampled {sum(len(s.completion_ids) for s in samples)} tokens"
    )
    if not ok:
        raise SystemExit("gpu_check: a rank's vLLM engine is not on the rank's own GPU")
    return {"ranks": everyone, "engine_start_seconds": round(started, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from opd_runtime import modeling
    from opd_runtime.distill.learner import train_on_samples
    from opd_runtime.generation import Sample
    from opd_runtime.sft.trainer import micro_batch_nll
    from opd_runtime.spec import DistillSpec, LoraSpec, OptimizerSpec
    from opd_runtime.training import activations, distributed, sharding
    from opd_runtime.training.loop import optimizer_step
    from opd_runtime.training.model_setup import build_trainable, optimizer_for

    config = TINY if args.tiny else QWEN3_1_7B
    with distributed.session():
        dev = modeling.device()
        rank, world = distributed.rank(), distributed.world_size()
        say = print if distributed.is_main() else (lambda *_: None)
        work = Path(args.workdir or tempfile.gettempdir()) / f"opd-gpu-check-{'tiny' if args.tiny else 'qwen3-1.7b'}"
        if distributed.is_main():
            t = time.perf_counter()
            write_model(config, work)
            say(f"model: {work} ({time.perf_counter() - t:.0f}s to write)")
        distributed.barrier()

        t = time.perf_counter()
        model = build_trainable(str(work), LoraSpec(enabled=False), "bfloat16", None, strategy="auto")
        activations.use_gradient_checkpointing(model, bool(args.gradient_checkpointing))
        attention = activations.use_fast_attention(model, say)
        model.train()
        optimizer, scheduler = optimizer_for(model.parameters(), OptimizerSpec(learning_rate=1e-5), 10)
        params = n_params(model)
        precision = getattr(model, "_opd_precision", None)
        say(
            f"device {dev} x {world}, {params / 1e6:,.1f}M parameters, strategy "
            f"{'fsdp' if sharding.is_sharded(model) else 'ddp'}, attention {attention}, "
            f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
            f"precision {precision} ({time.perf_counter() - t:.0f}s to load)"
        )
        gen = torch.Generator().manual_seed(1234 + rank)
        vocab = config["vocab_size"]
        rows = []

        def report(name: str, seconds: float, lengths: list[int], mem: float) -> None:
            tokens = distributed.all_sum(sum(lengths))[0]
            flops = distributed.all_sum(model_flops(params, config, lengths))[0]
            peak = PEAK_FLOPS["bf16"] * world if dev.type == "cuda" else None
            mem = distributed.all_max(mem)
            row = {
                "step": name,
                "seconds": round(seconds, 3),
                "tokens": int(tokens),
                "tokens_per_second": round(tokens / seconds, 1),
                "peak_memory_gib": round(mem, 2),
                "model_flops": flops,
                "mfu": round(flops / seconds / peak, 4) if peak else None,
            }
            rows.append(row)
            say(
                f"{name}: {seconds:.2f}s, {tokens / seconds:,.0f} tokens/s, peak memory {mem:.1f} GiB "
                f"({'max over ranks, GPU allocated' if dev.type == 'cuda' else 'resident, CPU'}), "
                + (f"MFU {row['mfu']:.1%}" if peak else "MFU n/a on CPU")
            )

        # --- SFT: one packed row of 4 traces --------------------------------------------------------
        per = args.sft_tokens // 4
        examples = []
        for _ in range(4):
            ids = torch.randint(3, vocab, (per,), generator=gen).tolist()
            examples.append((ids[: per // 8], ids[per // 8 :]))
        n_completion = distributed.all_sum(sum(len(c) for _, c in examples))[0]
        reset_peak(dev)
        sync(dev)
        t = time.perf_counter()
        for _ in sharding.lockstep([examples], model):
            loss = micro_batch_nll(model, examples, packing=True, pad_id=0) / n_completion
            loss.backward()
        distributed.all_reduce_gradients(model)
        grad_norm, _ = optimizer_step(model, optimizer, scheduler, 1.0)
        sync(dev)
        report(
            f"sft  1 packed row x {args.sft_tokens} tokens", time.perf_counter() - t, [per] * 4, peak_memory_gib(dev)
        )
        mean_nll = float(loss.detach()) * n_completion / max(1, sum(len(c) for _, c in examples))
        say(
            f"  loss {mean_nll:.3f} (random model: about ln {vocab} = {torch.log(torch.tensor(float(vocab))):.2f}), "
            f"grad norm {grad_norm:.3g}"
        )

        # --- OPD: samples with teacher log-probs, importance-sampling loss ------------------------
        prompt = args.opd_tokens // 16
        samples, teacher_lp = [], []
        for _ in range(args.opd_samples):
            ids = torch.randint(3, vocab, (args.opd_tokens,), generator=gen).tolist()
            completion = ids[prompt:]
            logprobs = (-torch.rand(len(completion), generator=gen) * 5).tolist()
            samples.append(Sample(ids[:prompt], completion, logprobs, True))
            teacher_lp.append((-torch.rand(len(completion), generator=gen) * 5).tolist())
        cfg = DistillSpec(
            prompts={"name": "tinymath"},
            prompts_per_step=args.opd_samples,
            samples_per_prompt=1,
            micro_batch_size=args.opd_micro_batch,
            loss="importance_sampling",
            gradient_checkpointing=bool(args.gradient_checkpointing),
        )
        total = int(distributed.all_sum(sum(len(s.completion_ids) for s in samples))[0])
        reset_peak(dev)
        sync(dev)
        t = time.perf_counter()
        stats = train_on_samples(model, samples, teacher_lp, cfg, 0, None, total_tokens=total)
        distributed.all_reduce_gradients(model)
        grad_norm, _ = optimizer_step(model, optimizer, scheduler, 1.0)
        sync(dev)
        report(
            f"opd  {args.opd_samples} samples x {args.opd_tokens} tokens",
            time.perf_counter() - t,
            [args.opd_tokens] * args.opd_samples,
            peak_memory_gib(dev),
        )
        say(f"  loss {stats.loss:.4f}, grad norm {grad_norm:.3g}")

        # --- the OPD sampler's vLLM engines: one per rank, each on the rank's GPU -----------------
        engines = vllm_placement(work, dev, args.vllm_memory, say) if args.vllm else None
        if args.json and distributed.is_main():
            Path(args.json).write_text(
                json.dumps(
                    {"world": world, "device": str(dev), "params": params, "rows": rows, "vllm_engines": engines},
                    indent=2,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
