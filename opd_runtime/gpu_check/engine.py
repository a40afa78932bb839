"""Part C of the GPU check: the OPD sampler's vLLM engine beside the trainer, as ``opd distill`` runs it.

One ``VllmSampler`` per process next to the trainer's model (full fine-tuning, float32 masters): it
samples (first weight load, checked on the probe), sleeps while the trainer takes a step on those samples
(the importance ratio p_trainer / p_sampler over their tokens is the behaviour log-probs' agreement with
the trainer's), wakes, reloads the updated weights (checked on the probe again) and samples once more.
The engine must run on its process's own GPU. Without a GPU or without vLLM this part is NOT CHECKED:
vLLM's GPU model runner, sleep mode and CUDA graphs exist only there (the CPU engine is what
tests/vllm/test_vllm_sampler.py covers).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch

from . import FAILED, NOT_CHECKED, PASSED, Check

PART = "vllm"
# Mean importance ratio over the sampled tokens: bf16 engine and bf16 trainer differ by kernel noise of
# ~1e-2 nats per token (vllm_sampler's probe baseline), so the mean ratio stays within a few percent of
# 1; stale or misplaced weights move it far more.
RATIO_MEAN_BOUND = 0.05


def unavailable(dev: torch.device) -> str | None:
    """Why this part cannot run here, or None."""
    if dev.type != "cuda":
        return "no GPU (vLLM's GPU runner, sleep mode and CUDA graphs need one)"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (the runtime-gpu image has it)"
    return None


def run(model_dir: Path, config: dict, args, dev: torch.device, say) -> list[Check]:
    reason = unavailable(dev)
    if reason is not None:
        return [Check(PART, "vllm beside the trainer", NOT_CHECKED, reason)]
    from ..distill.learner import train_on_samples
    from ..spec import DistillSpec, LoraSpec, OptimizerSpec
    from ..training import distributed
    from ..training.loop import optimizer_step
    from ..training.model_setup import build_trainable, optimizer_for
    from ..vllm_sampler import StaleSamplerWeights, VllmSampler

    model = build_trainable(str(model_dir), LoraSpec(enabled=False), "bfloat16", None, strategy="ddp")
    model.train()
    optimizer, scheduler = optimizer_for(model.parameters(), OptimizerSpec(learning_rate=1e-4), 10)
    # a random-init model has no tokenizer: the sampler needs only its stop tokens
    tokenizer = SimpleNamespace(
        eos_token_id=config["eos_token_id"], unk_token_id=None, convert_tokens_to_ids=lambda _t: None
    )
    gen = torch.Generator().manual_seed(99 + distributed.rank())
    prompts = [torch.randint(3, config["vocab_size"], (64,), generator=gen).tolist() for _ in range(4)]
    checks: list[Check] = []
    t = time.perf_counter()
    sampler = VllmSampler(
        str(model_dir), dtype="bfloat16", gpu_memory_utilization=args.vllm_memory, max_model_len=4096, log=say
    )
    started = time.perf_counter() - t
    try:
        engine_gpu = sampler.llm.collective_rpc("opd_device_uuid")[0]
        trainer_gpu = str(torch.cuda.get_device_properties(dev).uuid)
        mine = (distributed.rank(), engine_gpu, trainer_gpu)
        everyone: list = [mine]
        if distributed.active():
            import torch.distributed as dist

            everyone = [None] * distributed.world_size()
            dist.all_gather_object(everyone, mine)
        engines = [e for _, e, _ in everyone]
        placed = all(e == tr for _, e, tr in everyone) and len(set(engines)) == len(engines)
        checks.append(
            Check(
                PART,
                "engine placement",
                PASSED if placed else FAILED,
                f"{len(everyone)} engine(s), each on its own trainer's GPU"
                if placed
                else f"PLACEMENT WRONG: {everyone}",
                {"ranks": everyone, "engine_start_seconds": round(started, 1)},
            )
        )

        samples = sampler(model, tokenizer, prompts, n=2, max_new_tokens=128)
        first_probe = sampler.last_probe_error
        asleep = sampler.asleep and sampler.sleeps >= 1
        free_asleep = torch.cuda.mem_get_info(dev)[0] / 2**30
        checks.append(
            Check(
                PART,
                "sample, sleep",
                PASSED if asleep and samples else FAILED,
                f"{sum(len(s.completion_ids) for s in samples)} tokens sampled (engine started in {started:.0f}s), "
                f"first-load probe error {first_probe:.2e} nats, engine {'asleep' if asleep else 'NOT ASLEEP'} "
                f"while the trainer runs ({free_asleep:.1f} GiB free)",
                {"probe_error": first_probe, "free_gib_asleep": free_asleep},
            )
        )

        cfg = DistillSpec(
            prompts={"name": "tinymath"},
            prompts_per_step=len(prompts),
            samples_per_prompt=2,
            micro_batch_size=len(samples),
            loss="importance_sampling",
        )
        teacher_lp = [(-torch.rand(len(s.completion_ids), generator=gen) * 5).tolist() for s in samples]
        stats = train_on_samples(model, samples, teacher_lp, cfg, 0, None)
        distributed.all_reduce_gradients(model)
        optimizer_step(model, optimizer, scheduler, 1.0)
        mean_ratio = stats.ratio.ratio_sum / max(1, stats.ratio.tokens)
        checks.append(
            Check(
                PART,
                "behaviour vs trainer log-probs",
                PASSED if abs(mean_ratio - 1) <= RATIO_MEAN_BOUND else FAILED,
                f"p_trainer / p_sampler over {stats.ratio.tokens} sampled tokens: mean {mean_ratio:.4f} "
                f"(bound 1 ± {RATIO_MEAN_BOUND}), max {stats.ratio.ratio_max:.3f}",
                {"ratio_mean": mean_ratio, "ratio_max": stats.ratio.ratio_max},
            )
        )

        try:
            again = sampler(model, tokenizer, prompts, n=1, max_new_tokens=32)
            ok, why = sampler.syncs >= 2 and bool(again), ""
        except StaleSamplerWeights as err:
            ok, why = False, f": {err}"
        checks.append(
            Check(
                PART,
                "wake, reload, probe",
                PASSED if ok else FAILED,
                f"after one optimizer step: woke, reloaded ({sampler.syncs} syncs, "
                f"last {sampler.last_sync_seconds:.1f}s), "
                f"probe error {sampler.last_probe_error:.2e} within {sampler.tolerance():.2e}{why}",
                {"syncs": sampler.syncs, "probe_error": sampler.last_probe_error},
            )
        )
    finally:
        from ..vllm_engine import shutdown_engine

        shutdown_engine(sampler.llm)
    return checks
