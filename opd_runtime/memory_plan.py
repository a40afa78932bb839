"""The memory plan: each stage's predicted peak per GPU, before any GPU is used (``opd plan``).

Pure arithmetic on the spec and the model's shape (a table of known families, or a local config.json),
torch-free, so ``opd validate`` and the operator refuse a run that cannot fit before it is scheduled. The
formulas, per GPU and in bytes (P parameters, A LoRA adapter parameters, W processes sharing the weights
under FSDP, N tokens in one micro-batch, T the longest sequence in it):

- trainable weights, gradients, AdamW moments: float32 masters, 4 + 4 + 8 bytes per trainable parameter
  (``training.precision``), divided by W under FSDP, whole on every process under DDP; with LoRA the
  frozen base keeps the spec dtype and only the adapters have gradients and moments;
- the optimizer step: one float32 temporary of the trainable parameters (AdamW's foreach sqrt; on a CPU,
  which runs it tensor by tensor, two of the largest tensor);
- activations: with gradient checkpointing each decoder layer's input (L x N x hidden) plus one layer's
  saved tensors while it is recomputed; without, every layer's. Per token a Qwen3 layer saves about
  2 x hidden x (8 + c) + q_width x (4c + 4) + kv_width x (3c + 4) + 4c x intermediate bytes (c the compute
  dtype's size; RMSNorm works in float32), LoRA adds its adapters' inputs;
- attention: flash (bf16 on GPU) or CPU sdpa keep no T x T matrix; float32 compute on a GPU has no flash
  and GQA excludes the memory-efficient kernel, so sdpa takes the math path: 3 x heads x T^2 x 4 bytes at
  a layer's backward (probabilities, their gradient, the scores' gradient);
- the chunked output head: 3 x chunk x vocab x 4 bytes (a dense local teacher beside it: 5 x chunk/2);
- the vLLM sampler: while it samples, ``gpuMemoryUtilization`` x the GPU's memory beside the trainer's
  resident weights and moments (it sleeps while the trainer runs); its KV cache holds what is left of its
  share after its weights: per token 2 x layers x kv_heads x head_dim x 2 bytes;
- a local teacher: its weights in its dtype, its final hidden states and one layer's activations (no grad).

``predict`` returns one stage's ``StagePlan``; ``plan`` every planned stage's; ``problems`` the refusals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .contract import STAGES
from .spec import DistillationRun, ResourcesSpec
from .spec.gpus import DEFAULT_GPU, GIB, GPU_MEMORY_MIB, MIB, known_gpu, quantity_bytes
from .spec.stages import DistillSpec, SftSpec, resolve_strategy, stage_strategy

# CUDA context, cuBLAS workspace and NCCL buffers of one process: typical values, not measured here.
CUDA_OVERHEAD = GIB
# Tokens of the chunked head per pass (training.chunked.CHUNK_TOKENS, halved beside a dense teacher).
HEAD_CHUNK_TOKENS = 512
# Prompt length assumed in the distill stage and eval (prompts are not known before sampling).
PROMPT_ALLOWANCE = 1024
# vLLM's own activations and CUDA graphs inside its share, besides weights and KV cache (typical).
VLLM_RESERVE = GIB
# A peak above this share of the GPU is reported as tight (the plan is calibrated to ~15% on CPU).
TIGHT = 0.9
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


@dataclass(frozen=True)
class ModelShape:
    """The widths of a dense decoder (Qwen3 layout: q/k norms, SwiGLU MLP)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h = self.hidden
        attn = 2 * h * self.q_width + 2 * h * self.kv_width + 2 * self.head_dim  # q, o, k, v, q/k norms
        return attn + 3 * h * self.intermediate + 2 * h  # gate, up, down, two RMSNorms

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        """Adapter parameters (A: rank x in, B: out x rank) over every layer."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        sizes = {
            "q_proj": h + q,
            "k_proj": h + kv,
            "v_proj": h + kv,
            "o_proj": q + h,
            "gate_proj": h + i,
            "up_proj": h + i,
            "down_proj": i + h,
        }
        chosen = sizes if "all-linear" in targets else {k: v for k, v in sizes.items() if k in targets}
        return rank * sum(chosen.values()) * self.layers

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_width * dtype_bytes


def _qwen3(name: str, hidden: int, layers: int, heads: int, intermediate: int, tied: bool) -> ModelShape:
    return ModelShape(name, hidden, layers, heads, 8, 128, intermediate, 151_936, tied)


# The Qwen3 dense family (the -Base models share their shapes), from the published config.json files;
# parameter counts check against the published totals (0.6B: 596,049,920; 1.7B: 1.72B; 8B: 8.19B).
FAMILIES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _qwen3("Qwen3-0.6B", 1024, 28, 16, 3072, True),
        _qwen3("Qwen3-1.7B", 2048, 28, 16, 6144, True),
        _qwen3("Qwen3-4B", 2560, 36, 32, 9728, True),
        _qwen3("Qwen3-8B", 4096, 36, 32, 12288, False),
        _qwen3("Qwen3-14B", 5120, 40, 40, 17408, False),
        _qwen3("Qwen3-32B", 5120, 64, 64, 25600, False),
    )
}


def model_shape(model: str, *, root: Path | None = None) -> ModelShape | None:
    """The shape of a hub id of a known family (``Qwen/Qwen3-8B``, ``Qwen/Qwen3-1.7B-Base``) or of a local
    model directory's config.json (relative paths against ``root``); None when neither says."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    if name.endswith("-Base"):
        name = name[: -len("-Base")]
    if name in FAMILIES and not Path(model).is_dir():
        return FAMILIES[name]
    path = Path(model)
    if not path.is_absolute() and root is not None:
        path = root / path
    config = path / "config.json"
    if "://" in model or not config.is_file():
        return None
    cfg = json.loads(config.read_text())
    cfg = cfg.get("text_config", cfg)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelShape(
            name=str(path),
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Gpu:
    name: str
    bytes: int
    stated: bool  # False: the spec names none, the default is assumed

    def describe(self) -> str:
        return f"{self.name} ({self.bytes / GIB:.1f} GiB)" + ("" if self.stated else ", assumed")


def gpu_of(resources: ResourcesSpec | None) -> Gpu:
    """The GPU a stage's ``resources`` name (gpuMemory over gpuType), else the default 80 GB H100."""
    if resources is not None and resources.gpu_memory:
        return Gpu(resources.gpu_type or "GPU", quantity_bytes(resources.gpu_memory), True)
    if resources is not None and resources.gpu_type:
        known = known_gpu(resources.gpu_type) or DEFAULT_GPU
        return Gpu(known, GPU_MEMORY_MIB[known] * MIB, True)
    return Gpu(DEFAULT_GPU, GPU_MEMORY_MIB[DEFAULT_GPU] * MIB, False)


@dataclass(frozen=True)
class TrainingCase:
    """One training process's workload, everything the arithmetic needs (``training_parts``)."""

    shape: ModelShape
    tokens: int  # N: tokens in one micro-batch (packed row, or rows x longest row)
    longest: int  # T: the longest sequence attention sees at once
    dtype: str = "bfloat16"  # the student's spec dtype
    lora_rank: int | None = None  # None: full fine-tuning
    lora_targets: tuple[str, ...] = ("all-linear",)
    gradient_checkpointing: bool = True
    world: int = 1  # processes of the stage
    strategy: str = "ddp"  # resolved: ddp or fsdp
    device: str = "cuda"  # "cpu": the bench's measurements (fp32, CPU sdpa, per-tensor AdamW)
    local_teacher: ModelShape | None = None  # a local teacher in the same process
    teacher_in_loss: bool = False  # its full distributions enter the chunked head (full_*_kl losses)
    teacher_dtype: str = "bfloat16"


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Phase:
    name: str
    parts: tuple[Part, ...]

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)


def _compute_bytes(case: TrainingCase) -> int:
    """Bytes of an activation: bf16 under autocast; float32 on a CPU and for float32 training; float16
    trains its float32 masters without autocast (``training.precision``), LoRA's fp16 base computes in fp16."""
    if case.device == "cpu" or case.dtype == "float32":
        return 4
    if case.dtype == "float16":
        return 2 if case.lora_rank else 4
    return 2


def _residual_bytes(case: TrainingCase) -> int:
    """Bytes of the residual stream (a checkpointed layer's input): float32 masters keep it float32 under
    autocast; a LoRA base in half precision and FSDP's bf16 gathered weights keep it in half."""
    if _compute_bytes(case) == 4:
        return 4
    return 2 if case.lora_rank or case.strategy == "fsdp" else 4


def layer_activation_bytes(shape: ModelShape, c: int, lora_rank: int | None) -> int:
    """Bytes one decoder layer saves for backward, per token (the module docstring's count)."""
    per = 2 * shape.hidden * (8 + c) + shape.q_width * (4 * c + 4) + shape.kv_width * (3 * c + 4)
    per += 4 * c * shape.intermediate
    if lora_rank:  # each adapter keeps its input (cast) and its rank-wide middle
        per += c * (5 * shape.hidden + shape.q_width + shape.intermediate) + 7 * c * lora_rank
    return per


def math_attention(case: TrainingCase) -> bool:
    """sdpa on the math kernel: float32 compute on a GPU (flash needs fp16/bf16, and GQA rules out the
    memory-efficient kernel)."""
    return case.device == "cuda" and _compute_bytes(case) == 4


def training_phases(case: TrainingCase) -> list[Phase]:
    """The phases of one training step on one process: forward/backward, then the optimizer step."""
    s = case.shape
    shard = case.world if case.strategy == "fsdp" else 1
    c, r = _compute_bytes(case), _residual_bytes(case)
    if case.lora_rank:
        frozen = 4 if case.device == "cpu" else DTYPE_BYTES[case.dtype]
        trainable = s.lora_params(case.lora_rank, case.lora_targets)
        weights = Part("weights", s.params * frozen + 4 * trainable, f"frozen base {frozen} B/param + fp32 adapters")
    else:
        trainable = s.params // shard
        weights = Part("weights", 4 * trainable, "fp32 masters" + (f", 1/{shard} (FSDP)" if shard > 1 else ""))
    grads = Part("gradients", 4 * trainable, "fp32")
    moments = Part("AdamW moments", 8 * trainable, "fp32 exp_avg + exp_avg_sq")
    resident = [weights, moments]
    if case.device == "cuda":
        resident.append(Part("CUDA context", CUDA_OVERHEAD, "typical"))
    if case.local_teacher is not None:
        t = case.local_teacher
        tb = 4 if case.device == "cpu" else DTYPE_BYTES[case.teacher_dtype]
        resident.append(Part("local teacher weights", t.params * tb, f"{tb} B/param"))
    n, T = case.tokens, case.longest
    layer = layer_activation_bytes(s, c, case.lora_rank)
    act: list[Part] = []
    if case.gradient_checkpointing:
        act.append(Part("checkpointed layer inputs", s.layers * n * s.hidden * r, f"{s.layers} x N x hidden x {r} B"))
        act.append(Part("recomputed layer", n * layer, f"{layer} B/token"))
    else:
        act.append(Part("layer activations", s.layers * n * layer, f"{s.layers} x {layer} B/token"))
        if c == 2 and not case.lora_rank and case.strategy != "fsdp":
            act.append(Part("bf16 weight copies", 2 * s.layers * s.layer_params, "autocast's casts, kept for backward"))
    act.append(Part("final hidden + its gradient", 2 * n * s.hidden * 4, "fp32"))
    if math_attention(case):
        act.append(
            # probabilities, their gradient, the scores' gradient; + the causal mask, bool and float
            Part("attention matrix (math sdpa)", 3 * s.heads * T * T * 4 + 5 * T * T, f"3 x heads x {T}^2 x 4 B")
        )
    if case.strategy == "fsdp" and shard > 1:
        act.append(Part("gathered layers", 2 * 2 * s.layer_params, "this and the prefetched layer, bf16"))
    if case.local_teacher is not None and case.teacher_in_loss:
        t = case.local_teacher
        tc = 4 if case.device == "cpu" else 2
        act.append(Part("teacher hidden states", n * t.hidden * tc, "kept for the chunk loop"))
        act.append(
            Part("head chunk (with teacher)", 5 * (HEAD_CHUNK_TOKENS // 2) * s.vocab * 4, "5 x 256 x vocab x 4 B")
        )
    else:
        act.append(Part("head chunk", 3 * HEAD_CHUNK_TOKENS * s.vocab * 4, f"3 x {HEAD_CHUNK_TOKENS} x vocab x 4 B"))
    if case.device == "cpu":
        largest = max(s.vocab * s.hidden, s.layer_params) if not case.lora_rank else s.hidden * case.lora_rank
        step_tmp = Part("AdamW temporaries", 2 * 4 * largest, "two of the largest tensor (per-tensor AdamW)")
    else:
        step_tmp = Part("AdamW temporaries", 4 * trainable, "foreach sqrt of exp_avg_sq")
    return [
        Phase("forward/backward", (*resident, grads, *act)),
        Phase("optimizer step", (*resident, grads, step_tmp)),
    ]


def training_peak(case: TrainingCase) -> int:
    """Predicted peak bytes of one training process (what a GPU check compares with max_memory_allocated
    plus the CUDA context)."""
    return max(p.bytes for p in training_phases(case))


@dataclass(frozen=True)
class StagePlan:
    stage: str
    gpu: Gpu
    gpus: int  # per pod (per node)
    phases: tuple[Phase, ...] = ()
    notes: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()  # what to change when it does not fit
    extra_problems: tuple[str, ...] = ()  # a vLLM engine that cannot start (weights or one sequence)

    @property
    def peak(self) -> Phase | None:
        return max(self.phases, key=lambda p: p.bytes) if self.phases else None

    @property
    def fits(self) -> bool:
        peak = self.peak
        return not self.extra_problems and (peak is None or peak.bytes <= self.gpu.bytes)

    def lines(self) -> list[str]:
        head = f"{self.stage}: {self.gpus} GPU(s) per pod, {self.gpu.describe()}"
        out = [head]
        peak = self.peak
        if peak is not None:
            for phase in self.phases:  # the peak phase part by part, the others as totals
                mark = "  <- peak" if phase is peak else ""
                out.append(f"  {phase.name}: {_gib(phase.bytes)} per GPU{mark}")
                if phase is peak:
                    out += [f"    {p.name:<30} {_gib(p.bytes):>10}  {p.note}" for p in phase.parts]
            share = peak.bytes / self.gpu.bytes
            verdict = "fits" if peak.bytes <= self.gpu.bytes else "DOES NOT FIT"
            tight = " (tight: above 90%)" if verdict == "fits" and share > TIGHT else ""
            out.append(f"  peak {_gib(peak.bytes)} of {_gib(self.gpu.bytes)} ({share:.0%}): {verdict}{tight}")
        out += [f"  {n}" for n in self.notes]
        out += [f"  DOES NOT FIT: {p}" for p in self.extra_problems]
        return out

    def refusal(self) -> str | None:
        """The message that refuses this stage, or None when it fits."""
        if self.fits:
            return None
        why = list(self.extra_problems)
        peak = self.peak
        if peak is not None and peak.bytes > self.gpu.bytes:
            top = sorted(peak.parts, key=lambda p: -p.bytes)[:4]
            parts = ", ".join(f"{p.name} {_gib(p.bytes)}" for p in top)
            why.insert(
                0,
                f"predicted peak {_gib(peak.bytes)} per GPU ({peak.name}) exceeds the {self.gpu.describe()}: {parts}",
            )
        assumed = "" if self.gpu.stated else f" (no spec.{self.stage}.resources.gpuType/gpuMemory: 80 GB assumed)"
        return f"spec.{self.stage}: memory plan{assumed}: " + "; ".join(why) + ". Change: " + ", ".join(self.fields)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _stage_resources(run: DistillationRun, stage: str) -> ResourcesSpec | None:
    if stage == "teacher":
        return run.spec.teacher.serving.resources
    spec = getattr(run.spec, stage)
    return spec.resources if spec is not None else None


def _training_case(
    run: DistillationRun, cfg: SftSpec | DistillSpec, shape: ModelShape, root: Path | None
) -> TrainingCase:
    res = cfg.resources
    world = max(1, res.gpus) * res.nodes
    lora = cfg.lora.enabled
    strategy = resolve_strategy(stage_strategy(cfg), lora=lora, world=world)
    if isinstance(cfg, SftSpec):
        longest = cfg.max_seq_length
        tokens = max(cfg.max_tokens_per_micro_batch or cfg.micro_batch_size * longest, longest)
    else:
        longest = cfg.max_new_tokens + PROMPT_ALLOWANCE
        tokens = max(cfg.max_tokens_per_micro_batch or cfg.micro_batch_size * longest, longest)
    teacher, dense = None, False
    if isinstance(cfg, DistillSpec) and cfg.objective == "distill" and run.spec.teacher.backend == "local":
        teacher = model_shape(run.spec.teacher.model, root=root)
        dense = cfg.loss in ("full_forward_kl", "full_reverse_kl")
    return TrainingCase(
        shape=shape,
        tokens=tokens,
        longest=longest,
        dtype=run.spec.student.dtype,
        lora_rank=cfg.lora.rank if lora else None,
        lora_targets=tuple(cfg.lora.target_modules),
        gradient_checkpointing=cfg.gradient_checkpointing,
        world=world,
        strategy=strategy,
        local_teacher=teacher,
        teacher_in_loss=dense,
        teacher_dtype=run.spec.teacher.dtype,
    )


def _vllm_engine(
    shape: ModelShape, share: int, longest: int, tp: int, what: str, fields: list[str]
) -> tuple[Part, list[str], list[str]]:
    """A vLLM engine's share, its KV-cache tokens, and why it cannot start (if so)."""
    weights = shape.params * 2 // tp
    kv_token = shape.kv_bytes_per_token() // min(tp, shape.kv_heads)
    free = share - weights - VLLM_RESERVE
    tokens = max(0, free) // kv_token
    notes = [
        f"{what}: weights {_gib(weights)}, KV cache {_gib(max(0, free))} = {tokens:,} tokens ({kv_token:,} B/token)"
    ]
    problems = []
    if tokens < longest:
        problems.append(
            f"{what}'s share {_gib(share)} leaves room for {tokens:,} KV-cache tokens after its weights "
            f"({_gib(weights)}), fewer than one sequence of {longest:,}: raise {fields[0]}"
        )
    return Part(f"{what} (vLLM share)", share, f"{tokens:,} KV tokens"), notes, problems


def predict(run: DistillationRun, stage: str, *, root: Path | None = None) -> StagePlan | None:
    """One stage's plan per GPU; None for a stage the run does not have. A stage on CPU or with a model of
    unknown shape gets a plan without phases and a note saying why."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    resources = _stage_resources(run, stage)
    gpu = gpu_of(resources)
    student = model_shape(run.spec.student.model, root=root)
    if stage == "teacher":
        serving = run.spec.teacher.serving
        gpus = resources.gpus if resources is not None else serving.tensor_parallel_size
        teacher = model_shape(run.spec.teacher.model, root=root)
        if teacher is None:
            return StagePlan(stage, gpu, gpus, notes=(f"not predicted: no shape known for {run.spec.teacher.model}",))
        fields = ["spec.teacher.serving.gpuMemoryUtilization", "spec.teacher.serving.tensorParallelSize"]
        share = int(serving.gpu_memory_utilization * gpu.bytes)
        part, tnotes, bad = _vllm_engine(
            teacher, share, serving.max_model_len, serving.tensor_parallel_size, "teacher", fields
        )
        return StagePlan(stage, gpu, gpus, (Phase("serving", (part,)),), tuple(tnotes), tuple(fields), tuple(bad))
    cfg = getattr(run.spec, stage)
    if cfg is None or not cfg.enabled:
        return None
    gpus = cfg.resources.gpus
    if gpus == 0:
        return StagePlan(stage, gpu, 0, notes=("not predicted: runs on CPU (resources.gpus 0)",))
    if stage == "eval":
        return _eval_plan(run, gpu, gpus, root)
    if student is None:
        return StagePlan(stage, gpu, gpus, notes=(f"not predicted: no shape known for {run.spec.student.model}",))
    case = _training_case(run, cfg, student, root)
    phases = training_phases(case)
    notes = [
        f"{case.strategy} over {case.world} process(es); micro-batch N={case.tokens:,} tokens, "
        f"longest T={case.longest:,}" + (f" (prompts assumed <= {PROMPT_ALLOWANCE})" if stage == "distill" else "")
    ]
    if math_attention(case):
        notes.append(
            f"dtype {case.dtype}: training computes in float32 on the GPU, so sdpa runs its math kernel "
            "(T x T per head); bfloat16 computes under autocast with flash attention"
        )
    fields = _training_fields(stage, cfg, case)
    problems: list[str] = []
    if isinstance(cfg, DistillSpec) and cfg.sampler.backend == "vllm":
        share = int(cfg.sampler.gpu_memory_utilization * gpu.bytes)
        sfields = ["spec.distill.sampler.gpuMemoryUtilization"]
        part, vnotes, problems = _vllm_engine(student, share, case.longest, 1, "sampler", sfields)
        phases.insert(0, Phase("sampling (vLLM awake)", (*_resident(phases[0]), part)))
        notes += vnotes
    elif isinstance(cfg, DistillSpec):
        kv = student.kv_bytes_per_token(_compute_bytes(case)) * cfg.sampler.batch_size * case.longest
        cache = Part("KV cache", kv, f"batchSize {cfg.sampler.batch_size} x T")
        phases.insert(0, Phase("sampling (hf generate)", (*_resident(phases[0]), cache)))
    if case.local_teacher is None and isinstance(cfg, DistillSpec) and run.spec.teacher.backend == "local":
        notes.append(f"local teacher {run.spec.teacher.model}: no shape known, not counted")
    if phases[0].name.startswith("sampling") and max(phases, key=lambda p: p.bytes) is phases[0]:
        fields.insert(
            0,
            "spec.distill.sampler.gpuMemoryUtilization"
            if cfg.sampler.backend == "vllm"
            else "spec.distill.sampler.batchSize (or sampler.backend vllm)",
        )
    return StagePlan(stage, gpu, gpus, tuple(phases), tuple(notes), tuple(fields), tuple(problems))


def _resident(train: Phase) -> tuple[Part, ...]:
    """What stays on the GPU between training steps (gradients are freed after each optimizer step)."""
    kept = ("weights", "AdamW moments", "CUDA context", "local teacher weights")
    return tuple(p for p in train.parts if p.name in kept)


def _training_fields(stage: str, cfg: SftSpec | DistillSpec, case: TrainingCase) -> list[str]:
    """What to change when a training stage does not fit, the likeliest remedy first."""
    out = []
    if math_attention(case):
        length = "maxSeqLength" if stage == "sft" else "maxNewTokens"
        out += ["spec.student.dtype: bfloat16 (flash attention, no T x T matrix)", f"spec.{stage}.{length}"]
    if not case.lora_rank:
        out.append(f"spec.{stage}.lora.enabled: true (optimizer state for the adapters only)")
        if case.world > 1 and case.strategy == "ddp":
            if isinstance(cfg, DistillSpec) and cfg.sampler.backend == "vllm":
                out.append(
                    "spec.distill.sampler.backend: hf (the vllm sampler keeps every process on ddp, a whole copy "
                    "each; with hf, strategy auto shards with fsdp)"
                )
            else:
                out.append(f"spec.{stage}.strategy: fsdp (weights, gradients and moments / {case.world})")
    if case.local_teacher is not None:
        out.append("spec.teacher.backend: vllm-server (the teacher on GPUs of its own)")
    out += [f"spec.{stage}.maxTokensPerMicroBatch", f"spec.{stage}.resources.gpuType or gpuMemory (a larger GPU)"]
    return out


def _eval_plan(run: DistillationRun, gpu: Gpu, gpus: int, root: Path | None) -> StagePlan:
    cfg = run.spec.eval
    assert cfg is not None
    if cfg.backend == "hf":
        return StagePlan("eval", gpu, gpus, notes=("not predicted: backend hf",))
    longest = cfg.max_new_tokens + PROMPT_ALLOWANCE
    share = int(cfg.gpu_memory_utilization * gpu.bytes)
    fields = ["spec.eval.gpuMemoryUtilization", "spec.eval.resources.gpus", "spec.eval.maxNewTokens"]
    phases, notes, problems = [], [], []
    for target in cfg.targets:
        model = run.spec.teacher.model if target == "teacher" else run.spec.student.model
        shape = model_shape(model, root=root)
        if shape is None:
            notes.append(f"{target}: not predicted, no shape known for {model}")
            continue
        part, n, p = _vllm_engine(shape, share, longest, gpus, f"eval {target}", fields)
        phases.append(Phase(f"eval {target}", (part,)))
        notes += n
        problems += p
    return StagePlan("eval", gpu, gpus, tuple(phases), tuple(notes), tuple(fields), tuple(problems))


def plan(run: DistillationRun, stages: Sequence[str], *, root: Path | None = None) -> list[StagePlan]:
    """The plans of ``stages`` (``plan.planned_stages(run)``), in order."""
    return [p for s in stages if (p := predict(run, s, root=root)) is not None]


def problems(run: DistillationRun, stages: Sequence[str], *, root: Path | None = None) -> list[str]:
    """One refusal message per stage that does not fit (empty: every predicted stage fits)."""
    return [m for p in plan(run, stages, root=root) if (m := p.refusal()) is not None]


def report_lines(plans: Sequence[StagePlan]) -> list[str]:
    """The table ``opd plan`` prints."""
    out = ["memory plan: predicted peak per GPU (docs/guides/memory-plan.md)"]
    for p in plans:
        out += p.lines()
    return out


def summary(plan_: StagePlan) -> str:
    """One line per stage, as ``opd validate`` prints it."""
    peak = plan_.peak
    if peak is None:
        return f"memory plan: {plan_.stage}: " + "; ".join(plan_.notes)
    verdict = "fits" if plan_.fits else "DOES NOT FIT"
    if plan_.fits and peak.bytes > TIGHT * plan_.gpu.bytes:
        verdict = "fits (tight: above 90%)"
    gpu = plan_.gpu.describe()
    return f"memory plan: {plan_.stage}: peak {_gib(peak.bytes)} of {gpu} per GPU ({peak.name}): {verdict}"
