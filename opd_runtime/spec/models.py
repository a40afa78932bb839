"""Models, datasets, LoRA and optimizer settings shared by the stages."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator

from .base import SpecModel
from .gpus import DEFAULT_GPU, GPU_MEMORY_MIB, known_gpu
from .pods import MERGE_RULE, QUEUE_NAME, PodSpecInputs

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
# What the recipe appends to every math problem; a dataset's `instruction` replaces it.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]
# Access modes that let only one node mount a volume: pods on other nodes wait forever (Multi-Attach).
SINGLE_NODE_ACCESS = frozenset({"ReadWriteOnce", "ReadWriteOncePod"})
MODEL_CACHE_MOUNT = "/model-cache"  # where teacher pods mount their model cache (operator and docs)


class ModelSpec(SpecModel):
    model: str = Field(
        description="Hugging Face hub id (e.g. Qwen/Qwen3-1.7B-Base) or a path to a local model directory. "
        "Relative paths are resolved against the workspace.",
        min_length=1,
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer to use instead of the model's own (hub id or path). "
        "Student and teacher must end up with identical tokenizers and chat templates.",
    )
    dtype: Dtype = Field("bfloat16", description="Weight dtype for training and serving. Use float32 on CPU.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub.")


class SecretKeySelector(SpecModel):
    name: str = Field(min_length=1, description="Name of the Secret (in the run's namespace).")
    key: str = Field(min_length=1, description="Key within it.")


class TeacherServingSpec(SpecModel):
    port: int = Field(8000, ge=1, le=65535, description="Port the vLLM OpenAI-compatible server listens on.")
    max_model_len: int = Field(16384, ge=16, description="Longest prompt+completion the teacher scores, in tokens.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one teacher replica is sharded over.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of accelerator memory vLLM may use (on CPU: of host memory)."
    )
    replicas: int = Field(
        1, ge=1, description="Teacher server replicas behind the Service (placement `deployment` only)."
    )
    placement: Literal["deployment", "sidecar"] = Field(
        "deployment",
        description="Where the operator runs the teacher server. `deployment`: a Deployment and Service of its "
        "own, started before the learner so it is loaded when distillation starts; with Kueue it is admitted "
        "apart from the learner, so it can hold its GPUs while the learner waits in the queue. `sidecar`: a "
        "sidecar container in each distill pod (a restartable init container, Kubernetes 1.29+), bound to "
        "127.0.0.1; the learner starts once its startup probe passes, and the teacher's GPUs and memory are "
        "part of the distill Job, so Kueue admits teacher and learner as one workload and the teacher holds "
        "nothing while the learner queues. A sidecar reloads the model with every distill attempt (use "
        "`modelCache.existingClaim` to keep the download), serves only its own pod (no `replicas`) and takes "
        "the distill stage's node selection; its `pod` env and envFrom still apply. Kubernetes only: `opd run` "
        "serves the teacher beside the stages either way.",
    )
    max_concurrent_requests: int = Field(
        16, ge=1, description="Scoring requests the learner keeps in flight against the teacher."
    )
    max_batch_tokens: int = Field(
        65536, ge=1, description="Token budget of one scoring request batch sent to the teacher."
    )
    top_logprobs: int = Field(
        20,
        ge=1,
        le=1000,
        description="Teacher log-probs per position that the learner asks the server for with "
        "the losses that need the teacher's distribution (`full_forward_kl`, `full_reverse_kl`): the k most "
        'likely next tokens, plus the sampled one. The tokens outside them are merged into one "any other '
        'token" outcome on both sides, so the loss is the exact KL between the teacher and student '
        "distributions coarsened that way: never more than the full KL, and equal to it when the k tokens "
        "hold all of the teacher's mass. The server starts with `--max-logprobs` of this value.",
    )
    retry_seconds: float = Field(
        600.0,
        gt=0,
        description="How long the learner retries a scoring request while the teacher is "
        "unreachable or answers 5xx (exponential backoff, at most 10 s between tries) before the step fails "
        "with a retryable error (exit code 1). Covers a teacher that is still loading when the learner starts.",
    )
    extra_args: list[str] = Field(default_factory=list, description="Extra command-line flags for `vllm serve`.")
    url: str | None = Field(
        None,
        description="Use an already running OpenAI-compatible teacher at this base URL instead of "
        "starting one (e.g. http://teacher:8000).",
    )
    resources: ResourcesSpec | None = Field(
        None, description="Pod resources of each teacher replica; by default it requests tensorParallelSize GPUs."
    )
    model_cache: ModelCacheSpec = Field(
        default_factory=lambda: ModelCacheSpec(),
        description="Where teacher pods keep the model they serve (Kubernetes only; `opd run` serves from the "
        "workdir). Teacher pods never mount the run's workspace, so they can run on any node while a stage "
        "holds a ReadWriteOnce workspace.",
    )
    ready_timeout_seconds: int = Field(
        1800,
        ge=1,
        description="Seconds the teacher Deployment has to become Available (model download and load "
        "included), counted from its creation or from when it stopped being Available; also its "
        "progressDeadlineSeconds. Past it (or at the Deployment's "
        "ProgressDeadlineExceeded) the attempt fails: the Deployment is deleted and started again per "
        "`spec.retries`, and the run fails when they are used up. Kubernetes only.",
    )
    pod: PodSpecInputs | None = Field(None, description="Pod inputs of the teacher pods. " + MERGE_RULE)
    queue_name: str | None = Field(
        None,
        pattern=QUEUE_NAME,
        max_length=63,
        description="Kueue LocalQueue of the teacher Deployment, instead of spec.queueName (e.g. a serving "
        "queue whose ClusterQueue does not preempt). Kueue admits each teacher pod on its own (its pod "
        "integration gates the pod until then); the run shows the teacher Queued meanwhile.",
    )
    network_policy: bool = Field(
        True,
        description="Create a NetworkPolicy `<run>-teacher` that admits to the teacher pods only this run's "
        "distill pods, on `port`; all other ingress to them is denied. Enforced only where the cluster's "
        "network plugin implements NetworkPolicy. Policies add up: to let e.g. Prometheus scrape vLLM's "
        "/metrics, add a policy allowing it, or set false. Kubernetes only.",
    )
    api_key_secret: SecretKeySelector | None = Field(
        None,
        description="A Secret key holding an API key for the teacher server: vLLM then answers its /v1 "
        "endpoints only to requests with `Authorization: Bearer <key>` (/health and /metrics stay open), and the "
        "learner sends it, also to a teacher at `url`. The teacher and distill pods read it from the Secret "
        "(a missing Secret keeps them from starting: the run shows the container config error); `opd run` "
        "reads it from the environment variable OPD_TEACHER_API_KEY instead.",
    )

    @model_validator(mode="after")
    def _cache_reachable_by_every_replica(self) -> Self:
        cache = self.model_cache
        if self.replicas > 1 and cache.existing_claim and SINGLE_NODE_ACCESS.issuperset(cache.access_modes):
            raise ValueError(
                f"replicas {self.replicas} share modelCache.existingClaim {cache.existing_claim!r}, whose "
                f"accessModes {cache.access_modes} let only one node mount it: replicas scheduled on other "
                "nodes would wait forever (Multi-Attach). Use a ReadWriteMany claim and set "
                "`modelCache.accessModes: [ReadWriteMany]`, or drop `modelCache.existingClaim` (each replica "
                "gets its own emptyDir), or set `replicas: 1`"
            )
        return self

    @model_validator(mode="after")
    def _one_sidecar_per_pod(self) -> Self:
        if self.placement == "sidecar" and self.replicas > 1:
            raise ValueError(
                f"replicas {self.replicas} with placement `sidecar`: a sidecar teacher serves only the distill "
                "pod it runs in; set `replicas: 1`, or `placement: deployment` for several replicas behind a Service"
            )
        return self


class TeacherSpec(ModelSpec):
    backend: Literal["vllm-server", "local"] = Field(
        "vllm-server",
        description="How the teacher scores sampled tokens: `vllm-server` (a vLLM server over "
        "HTTP; a Deployment on Kubernetes) or `local` (an in-process Hugging Face model in the learner).",
    )
    serving: TeacherServingSpec = Field(
        default_factory=TeacherServingSpec, description="vLLM server settings (backend `vllm-server`)."
    )


class DatasetSpec(SpecModel):
    name: str | None = Field(
        None,
        description="Built-in set (`tinymath`, `aime24`, `gsm8k`) or a Hugging Face hub dataset id "
        "(e.g. open-thoughts/OpenThoughts3-1.2M). Exactly one of `name` and `path`.",
    )
    path: str | None = Field(None, description="Local .jsonl or .parquet file with the same fields.")
    split: str = Field("train", description="Dataset split (tinymath: `train` or `test`).")
    format: Literal["auto", "openthoughts", "chat", "problem"] = Field(
        "auto",
        description="Record layout: `openthoughts` (conversations of {from, value}), `chat` "
        "(messages of {role, content}), `problem` (a problem and an answer field). `auto` infers it.",
    )
    problem_field: str = Field("problem", description="Field holding the problem text (`problem` format).")
    answer_field: str = Field("answer", description="Field holding the reference answer (`problem` format).")
    max_samples: int | None = Field(
        None, ge=1, description="Use at most this many records (after `filter` and `shuffle`)."
    )
    difficulty: int = Field(2, ge=1, le=8, description="tinymath only: operations per problem minus one.")
    seed: int = Field(0, description="Seed of the tinymath generator, and of `shuffle` for the other sources.")
    instruction: str | None = Field(
        None,
        description="Text appended to each problem, after a newline, in the same way wherever the dataset is "
        "used: OPD prompts, eval prompts, and the first user turn of SFT traces. Empty (null, the default): "
        f"the dataset's own default, which is `{MATH_INSTRUCTION}` (the recipe's) for prompts and eval "
        "problems of every source except tinymath, and nothing for tinymath (the tiny world is trained "
        'without it) and for SFT traces (kept as recorded). `""`: nothing is appended.',
    )
    system_prompt: str | None = Field(
        None,
        description="A system message put first in every conversation built from this dataset (OPD prompts, "
        "eval prompts, SFT traces), replacing a record's own system turn. Empty (null, the default): no system "
        'message is added and records keep their own. `""`: records\' own system turns are dropped too.',
    )
    filter: dict[str, Any] = Field(
        default_factory=dict,
        description="Keep only the records whose fields equal these values, every entry alike (e.g. "
        "`{domain: math}` for open-thoughts/OpenThoughts3-1.2M); a record without the field is dropped. "
        "Values are strings, numbers or booleans, compared by equality. Applied to the raw records, before "
        "`shuffle` and `maxSamples`. Not for tinymath.",
    )
    shuffle: bool = Field(
        False,
        description="Shuffle the records, seeded by `seed`, before `maxSamples` takes the first ones (so a "
        "sample is drawn from the whole set, not its head). Records stream through a buffer of "
        "`shuffleBuffer`: a full shuffle when the set fits in it, for hub datasets too. Not for tinymath, "
        "which is generated in a seeded random order already.",
    )
    shuffle_buffer: int = Field(
        10_000, ge=1, description="Records held at once by `shuffle` (memory vs how far a record may move)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.name is None) == (self.path is None):
            raise ValueError("set exactly one of `name` (built-in or hub dataset) and `path` (local file)")
        for column, value in self.filter.items():
            if not isinstance(value, (str, int, float, bool)):
                raise ValueError(
                    f"filter.{column}: {value!r} is not a string, number or boolean; records are kept when "
                    "their field equals the value, so give one value per field"
                )
        if self.name == "tinymath" and (self.filter or self.shuffle):
            raise ValueError(
                "`filter` and `shuffle` are for record sets; tinymath is generated, already in a seeded random "
                "order: remove them (choose problems with `difficulty`, `seed` and `maxSamples`)"
            )
        return self


class ProblemSetSpec(DatasetSpec):
    """Problems with reference answers: OPD prompts and eval sets."""

    kind: Literal["aime", "math"] = Field(
        "math",
        description="How answers are graded: `aime`: integer answers compared as integers; `math`: symbolic "
        "comparison with math-verify. Eval grades with it, and so do OPD's `sample_accuracy` metric and the "
        "`rl` reward.",
    )


class LoraSpec(SpecModel):
    enabled: bool = Field(False, description="Train a LoRA adapter instead of all weights.")
    rank: int = Field(128, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Modules to adapt; `all-linear` adapts every linear layer except the output head.",
    )


class OptimizerSpec(SpecModel):
    learning_rate: float = Field(1e-4, gt=0.0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0 to the peak.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate decay after warmup."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2.")
    max_grad_norm: float | None = Field(
        1.0,
        gt=0.0,
        description="Clip the global gradient norm to this value before each optimizer step; empty (null): "
        "no clipping (the norm is still logged as grad_norm).",
    )


# A Kubernetes resource quantity such as 8, 500m, 64Gi or 1.5G.
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"


class ResourcesSpec(SpecModel):
    gpus: int = Field(1, ge=0, description="GPUs (nvidia.com/gpu) the stage's pod requests.")
    cpu: str | None = Field(None, pattern=QUANTITY, description="CPU request and limit, e.g. `8`.")
    memory: str | None = Field(None, pattern=QUANTITY, description="Memory request and limit, e.g. `64Gi`.")
    gpu_type: str | None = Field(
        None,
        description=f"The GPU model the pods get, for the memory plan (`opd plan`): one of "
        f"{', '.join(GPU_MEMORY_MIB)}. Validation refuses a stage whose predicted peak per GPU exceeds its "
        f"memory. Empty (with gpuMemory empty too): planned for an 80 GB {DEFAULT_GPU}. Does not choose "
        "nodes: use nodeSelector or affinity for that.",
    )
    gpu_memory: str | None = Field(
        None,
        pattern=QUANTITY,
        description="Memory of one GPU for the memory plan, e.g. `96Gi`, for a GPU not in gpuType's list; "
        "overrides gpuType's memory.",
    )

    @model_validator(mode="after")
    def _gpu_known(self) -> Self:
        if self.gpu_type is not None and known_gpu(self.gpu_type) is None:
            raise ValueError(
                f"gpuType {self.gpu_type!r} is not one of {', '.join(GPU_MEMORY_MIB)}: name one of them, or "
                "give the GPU's memory as gpuMemory (e.g. `96Gi`)"
            )
        return self


class TrainingResourcesSpec(ResourcesSpec):
    """Resources of a training stage (sft, distill), which may span several pods."""

    nodes: int = Field(
        1,
        ge=1,
        description="Pods (normally one per node) the stage spans, each with `gpus` GPUs and one training "
        "process per GPU (one process with no GPU). Above 1 the stage runs as an Indexed Job of this many pods "
        "that meet through a headless Service (torchrun rendezvous on pod 0) and fail and retry together: one "
        "failed pod fails the attempt, and the next attempt restarts every pod from the last checkpoint. Every "
        "pod mounts the workspace, so it needs `workspace.accessModes: [ReadWriteMany]`.",
    )


class ModelCacheSpec(SpecModel):
    existing_claim: str | None = Field(
        None,
        description=f"A PersistentVolumeClaim mounted at {MODEL_CACHE_MOUNT} in every teacher pod: e.g. "
        "ReadWriteMany, or pre-filled so no replica downloads the model. Hub downloads (HF_HOME) and "
        "`tiny://` builds go there, and a relative teacher model path (`./NAME`) resolves against it. "
        "Empty: each teacher pod gets its own emptyDir and fetches the model when it starts.",
    )
    access_modes: list[AccessMode] = Field(
        default_factory=lambda: list[AccessMode](["ReadWriteOnce"]),
        min_length=1,
        description="The access modes of existingClaim, as its PVC declares them. With only ReadWriteOnce "
        "or ReadWriteOncePod one node can mount it, so validation refuses `replicas` above 1.",
    )
    size_limit: str | None = Field(
        None,
        pattern=QUANTITY,
        description="Without existingClaim: the emptyDir's size limit, e.g. `100Gi` (the kubelet evicts a "
        "pod that writes more). Empty: no limit.",
    )
