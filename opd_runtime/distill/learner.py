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
from typing import Any

import torch

from .. import modeling
from ..contract import TEACHER_API_KEY_ENV
from ..data_sources import load_prompts
from ..generation import Sample, sample
from ..grading import grade_many
from ..metrics import MetricsSink, NullSink
from ..preflight import TokenizerMismatch, compare_tokenizers
from ..spec import DistillationRun, DistillSpec, SpecError
from ..training import activations, checkpoint, chunked, distributed, sharding
from ..training.batches import length_groups, prompt_ids, right_pad
from ..training.loop import (
    Optimization,
    enabled_spec,
    end_step,
    finish_stage,
    optimizer_step,
    rank_log,
    start_optimization,
    train_model,
)
from ..training.order import batch_at
from ..workspace import Workspace
from ..world_step import ensure_world
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


@dataclass
class _Setup:
    """What the loop reads from the run and the workspace before its first step."""

    cfg: DistillSpec
    ws: Workspace
    init: str  # where the student starts (``init_model_path``)
    from_checkpoint: bool  # init is a stage's output (it carries its tokenizer), not the student model
    tokenizer: Any
    records: list  # the prompt records (``data_sources.load_prompts``)
    reward_kind: str  # how answers are graded (``rl.dataset_kind``)
    existing: Path | None  # the checkpoint to resume from

    @property
    def is_rl(self) -> bool:
        """Objective rl: the reward is the graded answer, and no teacher is loaded or contacted."""
        return self.cfg.objective == "rl"


def _setup(run: DistillationRun, workspace: Path, resume: bool, log: Callable[[str], None]) -> _Setup:
    """Check the run (a tokenizer pair the teacher cannot score, prompts rl cannot grade) before anything
    is written, then find the checkpoint to resume from and load the prompts."""
    cfg = enabled_spec(run.spec.distill, "distill")
    ws = Workspace(Path(workspace))
    ensure_world(run, ws, "distill")
    init = init_model_path(run, ws)
    teacher_name = ws.resolve(run.spec.teacher.model)
    student = run.spec.student
    from_checkpoint = init != ws.resolve(student.model)  # stage outputs carry their tokenizer
    tokenizer = modeling.load_tokenizer(
        init if from_checkpoint or not student.tokenizer else ws.resolve(student.tokenizer), revision=student.revision
    )
    is_rl = cfg.objective == "rl"
    if not is_rl:
        teacher_tok = modeling.load_tokenizer(
            (run.spec.teacher.tokenizer and ws.resolve(run.spec.teacher.tokenizer)) or teacher_name,
            revision=run.spec.teacher.revision,
        )
        mismatches = compare_tokenizers(tokenizer, teacher_tok)
        if mismatches:
            raise TokenizerMismatch(mismatches, init, teacher_name)
    # after the pair check: a refused pair leaves the workspace untouched (resumable records a fingerprint)
    existing = checkpoint.resumable(ws.checkpoints("distill"), resume, run, "distill")

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
    return _Setup(cfg, ws, init, from_checkpoint, tokenizer, records, reward_kind, existing)


def _step_prompts(setup: _Setup, step: int, cache: dict[str, list[int]]) -> tuple[list, list[list[int]]]:
    """This process's share of the step's prompt records (all of them for a single process) and their
    token ids (each prompt tokenized once per stage, in ``cache``)."""
    cfg = setup.cfg
    batch = distributed.share(batch_at(setup.records, step * cfg.prompts_per_step, cfg.prompts_per_step, cfg.seed))
    for r in batch:
        if r.id not in cache:
            cache[r.id] = prompt_ids(setup.tokenizer, r.messages)
    return batch, [cache[r.id] for r in batch]


@dataclass
class _Scores:
    """What the loss needs besides the samples: the teacher's log-probs (objective distill) or the
    rewards and their group advantages (objective rl)."""

    # per sample, the teacher's log-prob of each completion token; None when the loss reads them from the
    # teacher's forward inside train_on_samples (a local teacher with a full-distribution loss), or for rl
    teacher_logprobs: list[list[float]] | None = None
    rewards_PG: list[float] | None = None  # rl: 1.0 per correct sample, prompts x samplesPerPrompt
    advantages_PG: list[float] | None = None  # rl: group-normalised rewards, same layout


def _score(setup: _Setup, teacher: Teacher | None, samples: Sequence[Sample], answers: Sequence[str | None]) -> _Scores:
    cfg = setup.cfg
    if teacher is None:  # rl: grade each completion, then compare the samples of each prompt
        texts = setup.tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        rewards_PG = rl.rewards(texts, answers, setup.reward_kind)
        advantages_PG = rl.group_advantages(rewards_PG, cfg.samples_per_prompt, scale_by_std=cfg.rl.scale_by_std)
        return _Scores(rewards_PG=rewards_PG, advantages_PG=advantages_PG)
    if cfg.loss in FULL_KL and teacher.scores_from_kl_targets:
        # the teacher runs once per micro-batch inside train_on_samples, giving the distributions and these
        # log-probs together
        return _Scores()
    return _Scores(teacher_logprobs=teacher.score(samples))


def _graded(tokenizer, samples: Sequence[Sample], answers: Sequence[str | None], kind: str) -> tuple[int, int]:
    """(correct, graded): samples whose answer matches, out of those with a reference answer, compared as
    the prompts' ``kind`` says (as eval compares them)."""
    graded = [(s, a) for s, a in zip(samples, answers) if a is not None]
    if not graded:
        return 0, 0
    texts = tokenizer.batch_decode([s.completion_ids for s, _ in graded], skip_special_tokens=True)
    return sum(g.correct for g in grade_many([(t, a) for t, (_, a) in zip(texts, graded)], kind)), len(graded)


@dataclass
class _StepTimes:
    """``time.perf_counter()`` at the step's start and after sampling, scoring and the optimizer step."""

    start: float
    sampled: float
    scored: float
    trained: float


def _record(
    setup: _Setup,
    step: int,
    *,
    samples: Sequence[Sample],
    answers: Sequence[str | None],
    prompts_here: int,
    scores: _Scores,
    stats: StepStats,
    n_tokens: int,
    grad_norm: float,
    lr: float,
    times: _StepTimes,
    weight_sync_seconds: float,
) -> dict:
    """The step's metrics line, over all processes (each process's loss, KL and entropy are already
    divided by the whole step's completion tokens, ``n_tokens``)."""
    cfg, is_rl, rewards_PG = setup.cfg, setup.is_rl, scores.rewards_PG
    # rl graded every sample already (all have answers): its rewards are the sample accuracy
    if rewards_PG is not None:
        correct_graded = (int(sum(rewards_PG)), len(rewards_PG))
    else:
        correct_graded = _graded(setup.tokenizer, samples, answers, cfg.prompts.kind)
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
        rl.zero_variance_fraction(rewards_PG or (), cfg.samples_per_prompt) * prompts_here,
        prompts_here,
    )
    step_seconds = times.trained - times.start
    return {
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
        "sample_seconds": times.sampled - times.start,
        "teacher_seconds": times.scored - times.sampled,
        "train_seconds": times.trained - times.scored,
        "step_seconds": step_seconds,
        "tokens_per_second": n_tokens / step_seconds,
        # part of sample_seconds: loading the trainer's weights into a vLLM sampler (0 for hf)
        "weight_sync_seconds": weight_sync_seconds,
        # p_trainer / p_sampler per completion token: 1 when the sampler is exactly the trainer
        "importance_ratio_mean": ratio_sum / max(n_tokens, 1),
        "importance_ratio_max": ratio_max,
        "importance_ratio_capped_fraction": (
            capped / max(n_tokens, 1) if cfg.importance_ratio_cap is not None else None
        ),
    }


def _train(
    setup: _Setup, model, samples: Sequence[Sample], scores: _Scores, teacher: Teacher | None, opt: Optimization
) -> tuple[StepStats, int, float, float]:
    """One optimizer step on the step's samples over all processes: (this process's stats, the step's
    completion tokens, gradient norm, learning rate)."""
    cfg = setup.cfg
    n_tokens = int(distributed.all_sum(sum(len(s.completion_ids) for s in samples))[0])
    stats = train_on_samples(
        model,
        samples,
        scores.teacher_logprobs,
        cfg,
        setup.tokenizer.pad_token_id,
        teacher,
        total_tokens=n_tokens,
        sample_advantages=scores.advantages_PG,
    )
    distributed.all_reduce_gradients(model)
    grad_norm, lr = optimizer_step(model, opt.optimizer, opt.scheduler, cfg.optimizer.max_grad_norm)
    return stats, n_tokens, grad_norm, lr


def _step(
    setup: _Setup, step: int, model, teacher: Teacher | None, sampler, opt: Optimization, cache: dict[str, list[int]]
) -> dict:
    """Sample from the current weights, score the samples, train on them; the step's metrics line."""
    cfg = setup.cfg
    t0 = time.perf_counter()
    distributed.seed_step(cfg.seed, step)
    batch, prompts = _step_prompts(setup, step, cache)
    samples = sampler(
        model,
        setup.tokenizer,
        prompts,
        n=cfg.samples_per_prompt,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.sampler.batch_size,
    )
    t1 = time.perf_counter()
    answers = [r.answer for r in batch for _ in range(cfg.samples_per_prompt)]
    scores = _score(setup, teacher, samples, answers)
    t2 = time.perf_counter()
    stats, n_tokens, grad_norm, lr = _train(setup, model, samples, scores, teacher, opt)
    return _record(
        setup,
        step,
        samples=samples,
        answers=answers,
        prompts_here=len(batch),
        scores=scores,
        stats=stats,
        n_tokens=n_tokens,
        grad_norm=grad_norm,
        lr=lr,
        times=_StepTimes(t0, t1, t2, time.perf_counter()),
        weight_sync_seconds=getattr(sampler, "last_sync_seconds", 0.0),
    )


def run_distill(
    run: DistillationRun,
    workspace: Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    log = rank_log(log)
    setup = _setup(run, workspace, resume, log)
    cfg, ws = setup.cfg, setup.ws
    student = run.spec.student
    model = train_model(
        cfg,
        setup.init,
        setup.existing,
        student,
        revision=None if setup.from_checkpoint else student.revision,
        strategy=sharding.stage_strategy(cfg),
        log=log,
    )
    teacher = None if setup.is_rl else _teacher(run, ws, cfg)
    sampler = _sampler(run, cfg, setup.init, log)  # a vLLM sampler loads the trainer's weights before each sampling
    try:
        sink = (
            MetricsSink(ws.metrics("distill"), port=cfg.metrics_port, total_steps=cfg.steps)
            if distributed.is_main()
            else NullSink()
        )
        opt = start_optimization("distill", cfg, model, setup.existing, sink, log)
        prompt_cache: dict[str, list[int]] = {}
        for step in range(opt.start_step, cfg.steps):
            end_step(
                _step(setup, step, model, teacher, sampler, opt, prompt_cache),
                sink=sink,
                on_step=on_step,
                ckpt_root=ws.checkpoints("distill"),
                checkpointing=cfg.checkpointing,
                total_steps=cfg.steps,
                data_position=(step + 1) * cfg.prompts_per_step,
                model=model,
                tokenizer=setup.tokenizer,
                optimizer=opt.optimizer,
                scheduler=opt.scheduler,
            )
    finally:
        # the vLLM engine runs in processes of its own and holds memory until they stop
        if hasattr(sampler, "close"):
            sampler.close()
    return finish_stage(
        "distill",
        ws,
        model,
        setup.tokenizer,
        lora_enabled=cfg.lora.enabled,
        steps=cfg.steps,
        summary_metric="reward_mean" if setup.is_rl else "reverse_kl",
    )
