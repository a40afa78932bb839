"""The OPD learner loop (``opd distill``).

Each step: sample ``samplesPerPrompt`` completions for ``promptsPerStep`` prompts from the current
student -> the teacher scores exactly those tokens -> the loss of ``spec.distill.loss`` on completion
tokens (``importance_sampling`` or ``ppo`` on the advantage -klCoef * (student_lp - teacher_lp), or the
full-distribution ``full_reverse_kl`` / ``full_forward_kl``) -> one optimizer step. The next step samples
from the updated weights, so every sample is on-policy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import modeling
from ..contract import TEACHER_API_KEY_ENV
from ..data_sources import load_prompts
from ..generation import Sample, sample
from ..grading import judge_many
from ..metrics import MetricsSink, NullSink
from ..preflight import TokenizerMismatch, compare_tokenizers
from ..spec import DistillationRun, DistillSpec, SpecError
from ..training import activations, checkpoint, chunked, distributed, sharding
from ..training.batches import length_groups, prompt_ids, right_pad
from ..training.loop import end_step, finish_stage, optimizer_step
from ..training.model_setup import build_trainable, optimizer_for
from ..training.order import batch_at
from ..workspace import Workspace
from . import loss as L
from . import rl
from .teacher import LocalTeacher, Teacher, TeacherHidden


@dataclass
class StepStats:
    loss: float
    reverse_kl: float
    entropy: float
    completion_tokens: int
    ratio: L.RatioStats  # p_trainer / p_sampler over these samples' completion tokens


def init_model_path(run: DistillationRun, ws: Workspace) -> str:
    """Where the student starts: ``initFrom``, else the SFT stage's output when SFT runs, else the student."""
    spec = run.spec
    if spec.distill is not None and spec.distill.init_from:
        return ws.resolve(spec.distill.init_from)
    if spec.sft is not None and spec.sft.enabled:
        return str(ws.final_model("sft"))
    return ws.resolve(spec.student.model)


FULL_KL: dict[str, chunked.KlKind] = {"full_reverse_kl": "reverse", "full_forward_kl": "forward"}


def micro_batches(samples: Sequence[Sample], cfg: DistillSpec) -> list[list[int]]:
    """Indices of the samples per micro-batch: right-padded rows grouped by length, at most
    ``microBatchSize`` sequences and ``maxTokensPerMicroBatch`` padded tokens each."""
    return length_groups(
        [len(s.prompt_ids) + len(s.completion_ids) for s in samples],
        max_count=cfg.micro_batch_size,
        max_tokens=cfg.max_tokens_per_micro_batch,
    )


def _teacher_rows(targets, sel_BT: torch.Tensor, dev) -> chunked.TeacherRows:
    """The teacher's distributions at the selected positions (those that predict a completion token)."""
    if isinstance(targets, TeacherHidden):
        return chunked.DenseTeacherRows(targets.hidden_BTD[:, :-1][sel_BT.to(targets.hidden_BTD.device)], targets.head)
    return chunked.TopKRows(
        targets.ids_BTK[:, :-1].to(dev)[sel_BT],
        targets.logprobs_BTK[:, :-1].to(dev)[sel_BT],
        targets.valid_BTK[:, :-1].to(dev)[sel_BT],
    )


def train_on_samples(
    model,
    samples: Sequence[Sample],
    teacher_logprobs: Sequence[Sequence[float]] | None,
    cfg: DistillSpec,
    pad_id: int,
    teacher: Teacher | None = None,
    *,
    total_tokens: int | None = None,
    sample_advantages: Sequence[float] | None = None,
) -> StepStats:
    """Accumulate gradients of the OPD loss over micro-batches of the step's samples (no optimizer step).

    Loss, reverse KL and entropy are divided by ``total_tokens``, the completion tokens of the whole
    step over all processes (default: these samples' own), so the processes' values and gradients sum
    to the whole step's; ``completion_tokens`` counts these samples only.

    ``teacher_logprobs`` (the teacher's log-prob of each completion token) may be None with a
    full-distribution loss and a teacher whose ``kl_targets`` carry them (a local teacher): they are
    then read from the same teacher forward that gives the distributions, one per micro-batch.

    Each micro-batch: one forward of the student to its final hidden states (right-padded rows, no
    attention mask), then every per-token value (log-probs, entropy, full KL) from the positions that
    predict a completion token, a chunk of tokens at a time (``training.chunked``).

    ``sample_advantages`` (objective ``rl``): one advantage per sample, given to each of its completion
    tokens instead of the teacher's; ``teacher_logprobs`` and ``teacher`` are then unused and the
    reverse KL is reported as 0.
    """
    dev = next(model.parameters()).device
    n_tokens = sum(len(s.completion_ids) for s in samples)
    normalizer = float(max(n_tokens if total_tokens is None else total_tokens, 1))
    kl_kind = FULL_KL.get(cfg.loss)
    if sample_advantages is not None and (kl_kind is not None or len(sample_advantages) != len(samples)):
        raise ValueError(
            f"sample advantages need one value per sample and loss importance_sampling or ppo, not {cfg.loss}"
        )
    if sample_advantages is None and kl_kind is None and teacher_logprobs is None:
        raise ValueError(f"loss {cfg.loss} needs the teacher's log-probs of the sampled tokens")
    if kl_kind is not None and teacher is None:
        raise ValueError(f"loss {cfg.loss} needs the teacher's distributions")
    head = chunked.output_head(model)
    total_loss = total_kl = total_entropy = 0.0
    ratio = L.RatioStats()
    for group in sharding.lockstep(micro_batches(samples, cfg), model):
        chunk = [samples[i] for i in group]
        batch = right_pad([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], pad_id)
        old_lp_BT = torch.zeros_like(batch.loss_mask_BT)
        teacher_lp_BT = torch.zeros_like(batch.loss_mask_BT)
        rl_adv_BT = torch.zeros_like(batch.loss_mask_BT)  # objective rl: each sample's advantage on its tokens
        for b, (i, s) in enumerate(zip(group, chunk)):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            old_lp_BT[b, p : p + c] = torch.tensor(s.logprobs)
            if sample_advantages is not None:
                rl_adv_BT[b, p : p + c] = sample_advantages[i]
            elif teacher_logprobs is not None:
                teacher_lp_BT[b, p : p + c] = torch.tensor(teacher_logprobs[i])
        mask_BT = batch.loss_mask_BT.to(dev)
        old_lp_BT, teacher_lp_BT = old_lp_BT.to(dev), teacher_lp_BT.to(dev)
        ids_BT = batch.input_ids_BT.to(dev)
        sel_BT = chunked.select_predicting(mask_BT)  # (B, T-1): position t predicts completion token t+1
        rows = None
        if kl_kind is not None:
            assert teacher is not None  # checked above
            rows = _teacher_rows(teacher.kl_targets(batch.input_ids_BT, batch.attention_mask_BT), sel_BT, dev)
        hidden_BTD = chunked.final_hidden_states(model, ids_BT)
        terms = chunked.token_terms(
            hidden_BTD[:, :-1][sel_BT],
            head,
            ids_BT[:, 1:][sel_BT],
            temperature=cfg.temperature,
            entropy=True,
            kl=kl_kind,
            teacher=rows,
        )
        if teacher_logprobs is None and sample_advantages is None:  # read from the teacher's forward above
            if terms.teacher_logprobs_N is None:
                raise ValueError("the teacher's log-probs were neither given nor derivable from its kl_targets")
            teacher_lp_BT[:, 1:][sel_BT] = terms.teacher_logprobs_N.to(teacher_lp_BT.dtype)
        if sample_advantages is not None:
            adv_N = rl_adv_BT.to(dev)[:, 1:][sel_BT]
        else:
            adv_N = L.advantages(
                old_lp_BT,
                teacher_lp_BT,
                mask_BT,
                kl_coef=cfg.kl_coef,
                discount=cfg.discount,
                log_ratio_clip=cfg.log_ratio_clip,
            )[:, 1:][sel_BT]
        old_lp_N = old_lp_BT[:, 1:][sel_BT]
        ones_N = torch.ones_like(old_lp_N)  # every selected position carries the loss
        if terms.kl_N is not None:
            loss = terms.kl_N.sum() / normalizer
        elif cfg.loss == "ppo":
            loss = L.ppo_loss(terms.logprobs_N, old_lp_N, adv_N, ones_N, normalizer, clip=cfg.ppo_clip)
        else:
            loss = L.importance_sampling_loss(
                terms.logprobs_N, old_lp_N, adv_N, ones_N, normalizer, ratio_cap=cfg.importance_ratio_cap
            )
        loss.backward()
        with torch.no_grad():
            total_loss += float(loss)
            if sample_advantages is None:
                total_kl += float(L.per_token_reverse_kl(old_lp_BT, teacher_lp_BT, mask_BT).sum())
            total_entropy += float(terms.entropy_N.sum()) if terms.entropy_N is not None else 0.0
            ratio.add(
                terms.logprobs_N, old_lp_N, cfg.importance_ratio_cap if cfg.loss == "importance_sampling" else None
            )
    return StepStats(total_loss, total_kl / normalizer, total_entropy / normalizer, n_tokens, ratio)


def _teacher(run: DistillationRun, ws: Workspace, cfg: DistillSpec) -> Teacher:
    t = run.spec.teacher
    if t.backend == "local":
        model = modeling.load_causal_lm(
            ws.resolve(t.model), dtype=t.dtype, revision=t.revision, trust_remote_code=t.trust_remote_code
        )
        activations.use_fast_attention(model)
        return LocalTeacher(
            model,
            micro_batch_size=max(cfg.micro_batch_size, 32),
            max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch,
        )
    from .server_teacher import ServerTeacher

    s = t.serving
    if not s.url:
        raise SpecError(
            "spec.teacher.serving.url: the `vllm-server` teacher backend needs the server's base URL: "
            "start the teacher with `opd serve-teacher --config FILE --workspace DIR` and pass "
            "`opd distill --teacher-url http://HOST:PORT` (or set serving.url), or set "
            "`backend: local` to score with an in-process teacher"
        )
    full = cfg.loss in ("full_reverse_kl", "full_forward_kl")  # these read the teacher's top-k
    return ServerTeacher(
        s.url,
        top_logprobs=s.top_logprobs if full else 0,
        max_batch_tokens=s.max_batch_tokens,
        max_concurrent_requests=s.max_concurrent_requests,
        retry_seconds=s.retry_seconds,
        log=print,
        api_key=os.environ.get(TEACHER_API_KEY_ENV),  # spec.teacher.serving.apiKeySecret, set by the operator
    )


def _sampler(run: DistillationRun, cfg: DistillSpec, init: str, log: Callable[[str], None] = print):
    """``generation.sample`` (backend ``hf``) or a VllmSampler with the same call signature (``vllm``).

    With LoRA the engine holds the base weights once and receives only the adapter after each step (vLLM's
    LoRA support): closer to the trainer than a merge rounded to bf16, and far less to copy per step.
    """
    if cfg.sampler.backend == "hf":
        return sample
    from ..serving import VLLM_MISSING, vllm_installed

    if not vllm_installed():
        raise SpecError(f"spec.distill.sampler.backend: vllm: {VLLM_MISSING}")
    from ..vllm_sampler import VllmSampler

    student = run.spec.student
    return VllmSampler(
        init,
        dtype=student.dtype,
        gpu_memory_utilization=cfg.sampler.gpu_memory_utilization,
        seed=cfg.seed,
        trust_remote_code=student.trust_remote_code,
        log=log,
        lora_rank=cfg.lora.rank if cfg.lora.enabled else None,
    )


def _graded(tokenizer, samples: Sequence[Sample], answers: Sequence[str | None], kind: str) -> tuple[int, int]:
    """(correct, graded): samples whose answer matches, out of those with a reference answer, compared as
    the prompts' ``kind`` says (as eval compares them)."""
    graded = [(s, a) for s, a in zip(samples, answers) if a is not None]
    if not graded:
        return 0, 0
    texts = tokenizer.batch_decode([s.completion_ids for s, _ in graded], skip_special_tokens=True)
    return sum(g.correct for g in judge_many([(t, a) for t, (_, a) in zip(texts, graded)], kind)), len(graded)


def _quiet(*_args) -> None:
    pass


def run_distill(
    run: DistillationRun,
    workspace: Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    cfg = run.spec.distill
    if cfg is None or not cfg.enabled:
        raise SpecError("spec.distill: the distill stage is not enabled in this run")
    if not distributed.is_main():  # rank 0 reports for all processes
        log = _quiet
    ws = Workspace(Path(workspace))
    ckpt_root = ws.checkpoints("distill")
    init = init_model_path(run, ws)
    teacher_name = ws.resolve(run.spec.teacher.model)
    student = run.spec.student
    from_checkpoint = init != ws.resolve(student.model)  # stage outputs carry their tokenizer
    tokenizer = modeling.load_tokenizer(
        init if from_checkpoint or not student.tokenizer else ws.resolve(student.tokenizer), revision=student.revision
    )
    is_rl = cfg.objective == "rl"  # the reward is the graded answer: no teacher is loaded or contacted
    if not is_rl:
        teacher_tok = modeling.load_tokenizer(
            (run.spec.teacher.tokenizer and ws.resolve(run.spec.teacher.tokenizer)) or teacher_name,
            revision=run.spec.teacher.revision,
        )
        mismatches = compare_tokenizers(tokenizer, teacher_tok)
        if mismatches:
            raise TokenizerMismatch(mismatches, init, teacher_name)
    # after the pair check: a refused pair leaves the workspace untouched (resumable records a fingerprint)
    existing = checkpoint.resumable(ckpt_root, resume, run, "distill")

    records = load_prompts(cfg.prompts, ws.root, field="spec.distill.prompts")
    reward_kind = rl.dataset_kind(cfg.prompts)
    if is_rl and any(r.answer is None for r in records):
        raise SpecError(
            "spec.distill.prompts: objective rl grades each completion against the prompt's reference answer, "
            f"but {sum(r.answer is None for r in records)} of {len(records)} records have none: use a dataset "
            "with answers (set answerField for `problem` files) or `objective: distill`"
        )
    for note in run.spec.notes():
        log(f"note: {note}")
    source = (
        f"reward: graded answers ({reward_kind})" if is_rl else f"teacher {teacher_name} ({run.spec.teacher.backend})"
    )
    log(
        f"distill ({cfg.objective}): student {init}, {source}, "
        f"{len(records)} prompts, {cfg.steps} steps x {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples"
    )

    torch.manual_seed(cfg.seed)
    model = build_trainable(
        init,
        cfg.lora,
        student.dtype,
        existing,
        revision=None if from_checkpoint else student.revision,
        trust_remote_code=student.trust_remote_code,
        strategy=sharding.stage_strategy(cfg),
    )
    activations.use_gradient_checkpointing(model, cfg.gradient_checkpointing)
    activations.use_fast_attention(model, log)
    distributed.broadcast_parameters(model)
    model.train()
    teacher = None if is_rl else _teacher(run, ws, cfg)
    sampler = _sampler(run, cfg, init, log)  # a vLLM sampler loads the trainer's weights before each sampling
    opt = cfg.optimizer
    optimizer, scheduler = optimizer_for(model.parameters(), opt, cfg.steps)
    sink = (
        MetricsSink(ws.metrics("distill"), port=cfg.metrics_port, total_steps=cfg.steps)
        if distributed.is_main()
        else NullSink()
    )
    start_step = checkpoint.restore(existing, optimizer, scheduler, model) if existing is not None else 0
    sink.begin(start_step)
    if start_step:
        log(f"distill: resumed from {existing} (step {start_step})")

    prompt_cache: dict[str, list[int]] = {}
    pad_id = tokenizer.pad_token_id
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        distributed.seed_step(cfg.seed, step)
        # this process's share of the step's prompts (all of them for a single process)
        batch = distributed.share(batch_at(records, step * cfg.prompts_per_step, cfg.prompts_per_step, cfg.seed))
        prompts = []
        for r in batch:
            if r.id not in prompt_cache:
                prompt_cache[r.id] = prompt_ids(tokenizer, r.messages)
            prompts.append(prompt_cache[r.id])
        samples = sampler(
            model,
            tokenizer,
            prompts,
            n=cfg.samples_per_prompt,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.sampler.batch_size,
        )
        t1 = time.perf_counter()
        answers = [r.answer for r in batch for _ in range(cfg.samples_per_prompt)]
        teacher_lp = rewards_PG = advantages_PG = None
        if teacher is None:  # rl: grade each completion, then compare the samples of each prompt
            texts = tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
            rewards_PG = rl.rewards(texts, answers, reward_kind)
            advantages_PG = rl.group_advantages(rewards_PG, cfg.samples_per_prompt, scale_by_std=cfg.rl.scale_by_std)
        elif not (cfg.loss in FULL_KL and teacher.scores_from_kl_targets):
            # a local teacher with a full-distribution loss runs once per micro-batch inside train_on_samples,
            # giving the distributions and these log-probs together; otherwise it scores the samples here
            teacher_lp = teacher.score(samples)
        t2 = time.perf_counter()
        n_tokens = int(distributed.all_sum(sum(len(s.completion_ids) for s in samples))[0])
        stats = train_on_samples(
            model, samples, teacher_lp, cfg, pad_id, teacher, total_tokens=n_tokens, sample_advantages=advantages_PG
        )
        distributed.all_reduce_gradients(model)
        grad_norm, lr = optimizer_step(model, optimizer, scheduler, opt.max_grad_norm)
        t3 = time.perf_counter()
        # rl graded every sample already (all have answers): its rewards are the sample accuracy
        if rewards_PG is not None:
            correct_graded = (int(sum(rewards_PG)), len(rewards_PG))
        else:
            correct_graded = _graded(tokenizer, samples, answers, cfg.prompts.kind)
        # the step's numbers over all processes (each process's values are already per global token)
        loss, reverse_kl, entropy, n_samples, finished, correct, graded, ratio_sum, capped = distributed.all_sum(
            stats.loss,
            stats.reverse_kl,
            stats.entropy,
            len(samples),
            sum(s.finished for s in samples),
            *correct_graded,
            stats.ratio.ratio_sum,
            stats.ratio.capped,
        )
        ratio_max = distributed.all_max(stats.ratio.ratio_max)
        reward_sum, zero_var_groups, groups = distributed.all_sum(
            sum(rewards_PG or ()),
            rl.zero_variance_fraction(rewards_PG or (), cfg.samples_per_prompt) * len(batch),
            len(batch),
        )
        record = {
            "step": step + 1,
            "reverse_kl": None if is_rl else reverse_kl,  # rl has no teacher to measure against
            # objective rl: mean reward of the step's samples, and the share of prompts whose samples all
            # earned the same reward (advantage 0, no signal); None with objective distill
            "reward_mean": reward_sum / n_samples if is_rl else None,
            "zero_variance_group_fraction": zero_var_groups / groups if is_rl else None,
            "entropy": entropy,
            "loss": loss,
            "completion_tokens": n_tokens,
            "mean_completion_length": n_tokens / n_samples,
            "finished_fraction": finished / n_samples,
            "sample_accuracy": correct / graded if graded else None,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "sample_seconds": t1 - t0,
            "teacher_seconds": t2 - t1,
            "train_seconds": t3 - t2,
            "step_seconds": t3 - t0,
            "tokens_per_second": n_tokens / (t3 - t0),
            # part of sample_seconds: loading the trainer's weights into a vLLM sampler (0 for hf)
            "weight_sync_seconds": getattr(sampler, "last_sync_seconds", 0.0),
            # p_trainer / p_sampler per completion token: 1 when the sampler is exactly the trainer
            "importance_ratio_mean": ratio_sum / max(n_tokens, 1),
            "importance_ratio_max": ratio_max,
            "importance_ratio_capped_fraction": (
                capped / max(n_tokens, 1) if cfg.importance_ratio_cap is not None else None
            ),
        }
        end_step(
            record,
            sink=sink,
            on_step=on_step,
            ckpt_root=ckpt_root,
            checkpointing=cfg.checkpointing,
            total_steps=cfg.steps,
            data_position=(step + 1) * cfg.prompts_per_step,
            model=model,
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
        )
    if hasattr(sampler, "close"):
        sampler.close()
    return finish_stage(
        "distill",
        ws,
        model,
        tokenizer,
        lora_enabled=cfg.lora.enabled,
        steps=cfg.steps,
        summary_metric="reward_mean" if is_rl else "reverse_kl",
    )
