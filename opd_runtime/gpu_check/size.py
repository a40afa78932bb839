"""Part B of the GPU check: a random-init Qwen3-1.7B trained at the lengths a real run uses.

Each case builds the model through ``model_setup.build_trainable`` exactly as the stages do (float32
masters, bf16 compute, LoRA when asked, FSDP when several processes, gradient checkpointing, the
attention the stages pick) and runs two optimizer steps: the first warms the kernels and the allocator,
the second is timed. Reported per case: wall time of the timed step, tokens/s over all processes, peak
accelerator memory (max over processes, allocated by torch; on a CPU the peak resident memory) next to
the memory plan's prediction (``memory_plan``) and MFU = model FLOPs / time / bf16 peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import FAILED, PASSED, Check, failed
from .shapes import PEAK_BF16_FLOPS, model_flops, n_params, peak_memory_gib, release, reset_peak, sync

PART = "size"


@dataclass(frozen=True)
class Case:
    kind: str  # "sft" or "opd"
    rows: int  # packed SFT: 1 row of traces; OPD: samples in one micro-batch
    tokens: int  # per row
    lora_rank: int | None  # None: full fine-tuning

    @property
    def name(self) -> str:
        train = f"lora r{self.lora_rank}" if self.lora_rank else "full"
        shape = f"1 packed row x {self.tokens}" if self.kind == "sft" else f"{self.rows} x {self.tokens}"
        return f"{self.kind} {train} {shape} tokens"


def cases(tiny: bool, lora_rank: int) -> list[Case]:
    """SFT at 16k and 32k packed tokens, OPD at 4 x 8k, full and LoRA (tiny: the same at 1/64 length)."""
    k = 256 if tiny else 16384
    shapes = [("sft", 1, k), ("sft", 1, 2 * k), ("opd", 4, k // 2)]
    return [Case(kind, rows, tokens, rank) for rank in (None, lora_rank) for kind, rows, tokens in shapes]


def predicted_peak_gib(
    case: Case, config: dict, gradient_checkpointing: bool, world: int, dev: torch.device
) -> float | None:
    """The memory plan's prediction for ``case`` (``memory_plan.training_peak``), or None where this
    build has no plan or the plan does not know the shape."""
    try:
        from .. import memory_plan as mp
    except ImportError:
        return None
    shape = mp.FAMILIES.get("Qwen3-1.7B") if config["hidden_size"] == 2048 else None
    if shape is None:
        return None
    lengths = [case.tokens] * case.rows
    planned = mp.TrainingCase(
        shape=shape,
        tokens=sum(lengths),
        longest=max(lengths) if case.kind == "opd" else case.tokens // 4,
        lora_rank=case.lora_rank,
        gradient_checkpointing=gradient_checkpointing,
        world=world,
        strategy="fsdp" if world > 1 and not case.lora_rank else "ddp",
        device=dev.type,
    )
    return mp.training_peak(planned) / 2**30


def run_case(case: Case, model_dir: Path, config: dict, args, dev: torch.device, say) -> Check:
    from ..distill.learner import train_on_samples
    from ..generation import Sample
    from ..sft.trainer import micro_batch_nll
    from ..spec import DistillSpec, LoraSpec, OptimizerSpec
    from ..training import activations, distributed, sharding
    from ..training.loop import optimizer_step
    from ..training.model_setup import build_trainable, optimizer_for

    lora = LoraSpec(enabled=case.lora_rank is not None, rank=case.lora_rank or 8, alpha=2.0 * (case.lora_rank or 8))
    reset_peak(dev)
    model = build_trainable(str(model_dir), lora, "bfloat16", None, strategy="auto")
    activations.use_gradient_checkpointing(model, bool(args.gradient_checkpointing))
    attention = activations.use_fast_attention(model, lambda *_: None)
    model.train()
    optimizer, scheduler = optimizer_for(
        [p for p in model.parameters() if p.requires_grad], OptimizerSpec(learning_rate=1e-5), 10
    )
    params = n_params(model)
    gen = torch.Generator().manual_seed(1234 + distributed.rank())
    vocab = config["vocab_size"]
    world = distributed.world_size()

    if case.kind == "sft":
        per = case.tokens // 4  # four traces packed into the row
        lengths = [per] * 4
        batch = []
        for _ in range(4):
            ids = torch.randint(3, vocab, (per,), generator=gen).tolist()
            batch.append((ids[: per // 8], ids[per // 8 :]))
        n_completion = distributed.all_sum(sum(len(c) for _, c in batch))[0]

        def step() -> float:
            for _ in sharding.lockstep([batch], model):
                loss = micro_batch_nll(model, batch, packing=True, pad_id=0) / n_completion
                loss.backward()
            return float(loss.detach())
    else:
        lengths = [case.tokens] * case.rows
        prompt = case.tokens // 16
        samples, teacher_lp = [], []
        for _ in range(case.rows):
            ids = torch.randint(3, vocab, (case.tokens,), generator=gen).tolist()
            completion = ids[prompt:]
            samples.append(
                Sample(ids[:prompt], completion, (-torch.rand(len(completion), generator=gen) * 5).tolist(), True)
            )
            teacher_lp.append((-torch.rand(len(completion), generator=gen) * 5).tolist())
        cfg = DistillSpec(
            prompts={"name": "tinymath"},
            prompts_per_step=case.rows,
            samples_per_prompt=1,
            micro_batch_size=case.rows,
            loss="importance_sampling",
            gradient_checkpointing=bool(args.gradient_checkpointing),
        )
        total = int(distributed.all_sum(sum(len(s.completion_ids) for s in samples))[0])

        def step() -> float:
            return train_on_samples(model, samples, teacher_lp, cfg, 0, None, total_tokens=total).loss

    seconds, loss = 0.0, float("nan")
    for _ in range(2):  # the first step warms kernels and the allocator; the second is timed
        sync(dev)
        t = time.perf_counter()
        loss = step()
        distributed.all_reduce_gradients(model)
        optimizer_step(model, optimizer, scheduler, 1.0)
        sync(dev)
        seconds = time.perf_counter() - t
    mem = distributed.all_max(peak_memory_gib(dev))
    tokens = distributed.all_sum(sum(lengths))[0]
    flops = distributed.all_sum(model_flops(params, config, lengths))[0]
    mfu = flops / seconds / (PEAK_BF16_FLOPS * world) if dev.type == "cuda" else None
    predicted = predicted_peak_gib(case, config, bool(args.gradient_checkpointing), world, dev)
    numbers = {
        "case": case.name,
        "seconds": round(seconds, 3),
        "tokens": int(tokens),
        "tokens_per_second": round(tokens / seconds, 1),
        "peak_memory_gib": round(mem, 2),
        "predicted_peak_gib": None if predicted is None else round(predicted, 2),
        "model_flops": flops,
        "mfu": None if mfu is None else round(mfu, 4),
        "loss": loss,
        "attention": attention,
        "params": params,
    }
    memory_where = "GPU allocated, max over ranks" if dev.type == "cuda" else "resident, CPU"
    detail = (
        f"{seconds:.2f}s, {tokens / seconds:,.0f} tokens/s, peak {mem:.1f} GiB ({memory_where}), plan "
        + (f"{predicted:.1f} GiB" if predicted is not None else "n/a")
        + (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a on CPU")
        + f", loss {loss:.3f}, attention {attention}"
    )
    ok = torch.isfinite(torch.tensor(loss)).item() and seconds > 0
    return Check(PART, case.name, PASSED if ok else FAILED, detail, numbers)


def run(work: Path, config: dict, args, dev: torch.device, say) -> list[Check]:
    from ..training import distributed
    from .shapes import write_model

    model_dir = work / ("size-model-tiny" if args.tiny else "size-model-qwen3-1.7b")
    if distributed.is_main():
        t = time.perf_counter()
        write_model(config, model_dir, dev)
        say(f"  model written to {model_dir} in {time.perf_counter() - t:.0f}s")
    distributed.barrier()
    out = []
    for case in cases(args.tiny, args.lora_rank):
        try:
            out.append(run_case(case, model_dir, config, args, dev, say))
        except Exception as err:  # one case out of memory must not hide the others (smaller, LoRA) cases
            out.append(failed(PART, case.name, err))
        release(dev)  # the failed case's tensors too, once its traceback is gone
    return out
