"""Part A of the GPU check: the training path's numbers on the device against references.

Tolerances. The device runs the stage's precision (bf16 compute, float32 masters; on a CPU float32); bf16
rounds to 8 significant bits (unit roundoff 2^-8 = 3.9e-3). A loss is a mean over hundreds of tokens of
terms around ln(vocab), whose rounding errors mostly cancel: 1e-2 relative (2.5 units of roundoff) bounds
it with room, and is far below what a wrong mask, position or reduction does (a single misplaced trace
moves it by tens of percent). Gradients are compared by cosine: bf16 noise leaves it above 0.99 (an error
of ~10% of the norm would be needed to go below), a wrong gradient (missing tokens, a dropped reduction)
does not. Between two float32 paths the same bounds hold a fortiori. The OPD loss is a mean of signed
terms that can cancel to near zero, so its error is taken relative to the size of those terms (the mean
|teacher - sampler| log-prob gap) when that is larger than the loss.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from ..training.distributed import local_device
from . import FAILED, PASSED, Check
from .shapes import write_model

LOSS_RTOL = 1e-2
GRAD_COSINE_MIN = 0.99
PART = "numerics"


def _verdict(name: str, ok: bool, detail: str, **numbers) -> Check:
    return Check(PART, name, PASSED if ok else FAILED, detail, numbers)


def _grads(model) -> torch.Tensor:
    """Every trainable parameter's gradient, flattened into one float32 CPU vector (FSDP: the full one)."""
    out = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        if g is None:
            g = torch.zeros(p.shape)
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out.append(g.detach().float().cpu().reshape(-1))
    return torch.cat(out)


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on the CPU (an FSDP shard gathered)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()).clamp_min(1e-30))


def _examples(config: dict, lengths: list[int], gen: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) pairs of random tokens: one eighth prompt, the rest completion."""
    out = []
    for n in lengths:
        ids = torch.randint(3, config["vocab_size"], (n,), generator=gen).tolist()
        out.append((ids[: max(1, n // 8)], ids[max(1, n // 8) :]))
    return out


def _model(config: dict, work: Path) -> Path:
    """The random model, written once by the main process while the others wait."""
    from ..training import distributed

    path = work / "numerics-model"
    if distributed.is_main():
        write_model(config, path, torch.device("cpu"))
    distributed.barrier()
    return path


def _reference(path: Path):
    """The float32 model on the CPU: the reference every device result is compared with."""
    from ..modeling import load_causal_lm
    from ..training.precision import FP32, attach

    model = load_causal_lm(str(path), dtype="float32", dev=torch.device("cpu"), load_dtype=torch.float32)
    return attach(model, FP32, torch.device("cpu"))


def _trainable(path: Path, strategy: str):
    from ..spec import LoraSpec
    from ..training.model_setup import build_trainable

    model = build_trainable(str(path), LoraSpec(enabled=False), "bfloat16", None, strategy=strategy)
    return _as_stages_run(model)


def _as_stages_run(model):
    """The attention the stages pick (sdpa_varlen for packed rows), in train mode."""
    from ..training import activations

    activations.use_fast_attention(model, lambda *_: None)
    model.train()
    return model


def _sft_loss_and_grads(model, examples, packing: bool) -> tuple[float, torch.Tensor]:
    from ..sft.trainer import micro_batch_nll
    from ..training import sharding

    model.zero_grad(set_to_none=True)
    n = sum(len(c) for _, c in examples)
    for _ in sharding.lockstep([examples], model):
        loss = micro_batch_nll(model, examples, packing=packing, pad_id=0) / n
        loss.backward()
    return float(loss.detach()), _grads(model)


def _opd_loss_and_grads(model, samples, teacher_lp) -> tuple[float, torch.Tensor]:
    from ..distill.learner import train_on_samples
    from ..spec import DistillSpec

    cfg = DistillSpec(
        prompts={"name": "tinymath"},
        prompts_per_step=len(samples),
        samples_per_prompt=1,
        micro_batch_size=len(samples),
        loss="importance_sampling",
    )
    model.zero_grad(set_to_none=True)
    stats = train_on_samples(model, samples, teacher_lp, cfg, 0, None)
    return float(stats.loss), _grads(model)


def _mean_advantage(samples, teacher_lp) -> float:
    """Mean |teacher - sampler| log-prob over the completion tokens: the size of the OPD loss's terms."""
    gaps = [abs(t - b) for s, ts in zip(samples, teacher_lp) for t, b in zip(ts, s.logprobs)]
    return sum(gaps) / max(1, len(gaps))


def _opd_batch(config: dict, lengths: list[int], gen: torch.Generator):
    from ..generation import Sample

    samples, teacher_lp = [], []
    for prompt, completion in _examples(config, lengths, gen):
        behaviour = (-torch.rand(len(completion), generator=gen) * 5).tolist()
        samples.append(Sample(prompt, completion, behaviour, True))
        teacher_lp.append((-torch.rand(len(completion), generator=gen) * 5).tolist())
    return samples, teacher_lp


def _compare(
    name: str, what: str, got: tuple[float, torch.Tensor], ref: tuple[float, torch.Tensor], scale: float = 0.0
) -> Check:
    """``scale``: the size of the loss's terms where the loss itself can be near zero (a mean of signed
    terms), so the error is relative to what was summed rather than to a value that cancelled."""
    rel, cos = abs(got[0] - ref[0]) / max(abs(ref[0]), scale, 1e-12), _cosine(got[1], ref[1])
    ok = math.isfinite(got[0]) and rel <= LOSS_RTOL and cos >= GRAD_COSINE_MIN
    detail = (
        f"{what}: loss {got[0]:.5f} vs {ref[0]:.5f} (relative {rel:.1e}, bound {LOSS_RTOL:.0e}), "
        f"gradient cosine {cos:.5f} (bound {GRAD_COSINE_MIN})"
    )
    return _verdict(name, ok, detail, loss=got[0], reference_loss=ref[0], loss_relative=rel, grad_cosine=cos)


def precision_and_packing(work: Path, config: dict, lengths: list[int], dev: torch.device) -> list[Check]:
    """The packed SFT loss and the OPD importance-sampling loss under the run's precision on ``dev``
    against float32 on the CPU; packed rows against the same traces padded."""
    path = _model(config, work)
    gen = torch.Generator().manual_seed(7)
    examples = _examples(config, lengths, gen)
    samples, teacher_lp = _opd_batch(config, lengths, gen)
    ref = _reference(path)
    ref_sft = _sft_loss_and_grads(ref, examples, packing=True)
    ref_opd = _opd_loss_and_grads(ref, samples, teacher_lp)
    del ref
    model = _trainable(path, "ddp")
    where = f"{dev.type} {model._opd_precision.compute or model._opd_precision.master} vs cpu float32"
    dev_sft = _sft_loss_and_grads(model, examples, packing=True)
    dev_opd = _opd_loss_and_grads(model, samples, teacher_lp)
    checks = [
        _compare("sft loss precision", f"packed SFT, {where}", dev_sft, ref_sft),
        _compare(
            "opd loss precision",
            f"OPD importance sampling, {where}",
            dev_opd,
            ref_opd,
            scale=_mean_advantage(samples, teacher_lp),
        ),
        _compare(
            "packed == unpacked",
            f"SFT on {dev.type}, {len(lengths)} traces packed into one row vs padded rows",
            dev_sft,
            _sft_loss_and_grads(model, examples, packing=False),
        ),
    ]
    return checks


def collectives(work: Path, config: dict, lengths: list[int], dev: torch.device) -> list[Check]:
    """On the process group (NCCL on GPUs): the data-parallel all-reduce, FSDP2 under the bf16 policy
    against the unsharded model, a DCP save and load, and a resume that puts every optimizer moment on its
    parameter's device."""
    import torch.distributed as dist

    from ..spec import OptimizerSpec
    from ..training import checkpoint, distributed, sharding
    from ..training.loop import optimizer_step
    from ..training.model_setup import optimizer_for

    path = _model(config, work)
    backend, world = dist.get_backend(), distributed.world_size()
    gen = torch.Generator().manual_seed(11 + distributed.rank())
    examples = _examples(config, lengths, gen)
    checks = []

    ddp = _trainable(path, "ddp")
    local = _sft_loss_and_grads(ddp, examples, packing=True)
    distributed.all_reduce_gradients(ddp)
    summed = _grads(ddp)
    # the reference: every rank's flat gradient summed by one plain all_reduce
    expected = local[1].to(distributed._device())
    dist.all_reduce(expected)
    expected = expected.cpu()
    err = float((summed - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    checks.append(
        _verdict(
            "all-reduce",
            err <= 1e-6,
            f"{backend}, {world} process(es): bucketed gradient all-reduce vs one all_reduce, max relative {err:.1e}",
            max_relative=err,
        )
    )

    if world == 1:
        # FSDP2 on one process: opd's resolve_strategy runs that as plain training, so shard directly
        fsdp = _fsdp_one_process(path, dev)
    else:
        fsdp = _trainable(path, "fsdp")
    masters = {p.dtype for p in fsdp.parameters()}
    sharded = all(hasattr(p, "full_tensor") for p in fsdp.parameters())
    got = _sft_loss_and_grads(fsdp, examples, packing=True)
    grad_dtypes = {p.grad.dtype for p in fsdp.parameters() if p.grad is not None}
    # FSDP's gradients are already summed over the processes: against the all-reduced unsharded ones
    check = _compare("fsdp2 bf16 policy", f"FSDP2 ({backend}) vs the unsharded model", got, (local[0], summed))
    policy_ok = masters == {torch.float32} and grad_dtypes == {torch.float32} and sharded
    check.detail += (
        f"; masters {sorted(map(str, masters))}, gradients {sorted(map(str, grad_dtypes))}, DTensor {sharded}"
    )
    if not policy_ok:
        check.status = FAILED
    checks.append(check)

    optimizer, scheduler = optimizer_for(fsdp.parameters(), OptimizerSpec(learning_rate=1e-4), 10)
    optimizer_step(fsdp, optimizer, scheduler, 1.0)
    root = Path(distributed.broadcast_object(tempfile.mkdtemp(prefix="dcp-", dir=work)))
    saved = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        for n, p in fsdp.named_parameters()
    }
    sharding.save_sharded(root, fsdp, optimizer)
    distributed.barrier()
    with torch.no_grad():
        for p in fsdp.parameters():
            p.add_(1.0)
    sharding.load_sharded(root, fsdp, optimizer)
    back = {n: _full(p) for n, p in fsdp.named_parameters()}
    same = all(torch.equal(saved[n], back[n]) for n in saved)
    moments = [s for st in optimizer.state.values() for s in st.values() if torch.is_tensor(s) and s.dim() > 0]
    checks.append(
        _verdict(
            "dcp save/load",
            same and bool(moments),
            f"DCP of the FSDP model and its AdamW state: weights {'restored exactly' if same else 'DIFFER'} "
            f"after a perturbation, {len(moments)} moment tensors",
        )
    )
    del fsdp, optimizer

    # resume: the trainer state written by rank 0, loaded by every rank onto its own device
    optimizer, scheduler = optimizer_for(ddp.parameters(), OptimizerSpec(learning_rate=1e-4), 10)
    _sft_loss_and_grads(ddp, examples, packing=True)
    optimizer_step(ddp, optimizer, scheduler, 1.0)
    ckpt = root / "resume"
    if distributed.is_main():
        ckpt.mkdir()
        torch.save(
            {
                "step": 1,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": checkpoint.rng_state(),
            },
            ckpt / checkpoint.STATE_FILE,
        )
    distributed.barrier()
    fresh, fresh_scheduler = optimizer_for(ddp.parameters(), OptimizerSpec(learning_rate=1e-4), 10)
    step = checkpoint.restore(ckpt, fresh, fresh_scheduler)
    wrong = [
        f"{s.device} for a parameter on {p.device}"
        for p, st in fresh.state.items()
        for s in st.values()
        if torch.is_tensor(s) and s.dim() > 0 and s.device != p.device
    ]
    checks.append(
        _verdict(
            "resume device",
            step == 1 and not wrong and bool(fresh.state),
            f"trainer state restored at step {step}: {len(fresh.state)} parameters' moments, "
            + (f"MISPLACED: {wrong[:2]}" if wrong else f"each on its parameter's device ({dev})"),
        )
    )
    distributed.barrier()
    if distributed.is_main():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return checks


def _fsdp_one_process(path: Path, dev: torch.device):
    from ..modeling import load_causal_lm
    from ..training import sharding
    from ..training.precision import training_precision

    precision = training_precision("bfloat16", dev)
    model = load_causal_lm(str(path), dtype="bfloat16", load_dtype=precision.master, dev=torch.device("cpu"))
    return _as_stages_run(sharding.shard(model, precision, dev))


def pin_device(dev: torch.device) -> torch.device:
    """This process's own GPU (``distributed.local_device``), made current; ``dev`` itself on a CPU."""
    dev = local_device(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def one_process_group(dev: torch.device):
    """A process group of this one process (NCCL on a GPU, gloo on a CPU), for the collectives; None when
    one is already there (torchrun started several processes). ``dev``: ``pin_device``'s."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist
