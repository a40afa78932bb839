"""The ``vllm`` sampler backend: the student sampled in-process by vLLM's offline engine.

``VllmSampler`` is called like ``generation.sample`` (the ``hf`` backend) and returns the same ``Sample``
objects: completion ids ending at the first stop token (kept), and the behaviour log-prob of each token
under the distribution it was drawn from (temperature applied: the engine runs with
``logprobs_mode="processed_logprobs"``; there is no top-p/top-k in OPD sampling).

Fresh weights. Before sampling, the sampler compares the trainer's parameters with the ones it last
loaded (torch bumps a tensor's version counter on every in-place update, which is how an optimizer step
changes them); if any changed, it writes the trainer's weights (LoRA merged in) as safetensors to a
scratch folder (``/dev/shm`` when there is one), has every vLLM worker reload them in place, empties the
prefix cache, and then checks that the engine's log-probs of a probe sequence equal the trainer's own,
so it never samples from stale weights silently. On CPU, vLLM's linear layers run through oneDNN
handles that hold a packed copy of the weight taken at load time; reloading the weights does not
refresh them, so the workers rebuild the handles after every reload (``SyncExtension``).

vLLM starts an engine process: a script that builds a ``VllmSampler`` needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .generation import Sample, stop_token_ids

PROBE_TOKENS = 64
# Largest |vLLM - trainer| log-prob on the probe after a reload: float32 engines agree to ~1e-6; half
# precision kernels differ more, so there the check only catches gross staleness.
PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.15, "float16": 0.1}


class StaleSamplerWeights(RuntimeError):
    """After a weight reload the engine's log-probs still differ from the trainer's."""


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


def trainer_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainer's weights under Hugging Face names, LoRA deltas merged in (the model is not changed)."""
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
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        delta = module.get_delta_weight(adapter)  # type: ignore[attr-defined]  # lora.Linear's
                        weight = weight + delta.detach().to(weight.dtype)
                merged[f"{name}.weight"] = weight
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = merged.get(key, value).detach().to("cpu").contiguous()
    if getattr(base.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # vLLM ties it to the embedding itself
    return out


def weights_version(model) -> int:
    """Changes whenever a parameter is updated in place (an optimizer step, a load_state_dict)."""
    return sum(p._version for p in model.parameters())


def _scratch_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class VllmSampler:
    """An in-process vLLM engine on the student, kept in step with the trainer's weights."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        trust_remote_code: bool = False,
        max_model_len: int | None = None,
        verify: bool = True,
    ):
        from .contract import NO_USAGE_STATS_ENV

        for key, value in NO_USAGE_STATS_ENV.items():  # read by vLLM when the engine starts
            os.environ.setdefault(key, value)
        from vllm import LLM

        from .serving import cuda_available, memory_utilization, serving_dtype

        self.cuda = cuda_available()
        self.dtype = serving_dtype(dtype, self.cuda)
        self.verify = verify
        memory = memory_utilization(gpu_memory_utilization, self.cuda)
        # token ids in, token ids out: the engine needs no tokenizer (stop ids come with each call)
        kwargs = dict(
            model=model_dir,
            skip_tokenizer_init=True,
            dtype=self.dtype,
            seed=seed,
            gpu_memory_utilization=memory,
            enforce_eager=not self.cuda,
            trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{SyncExtension.__module__}.{SyncExtension.__qualname__}",
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self._scratch = Path(tempfile.mkdtemp(prefix="opd-sampler-weights-", dir=_scratch_root()))
        self._version: int | None = None  # weights_version of the trainer weights the engine holds
        self._probe: list[int] | None = None
        self.syncs = 0
        self.last_probe_error: float | None = None

    # --- weights --------------------------------------------------------------------------------------

    def sync(self, model) -> None:
        """Load the trainer's current weights into the engine, then check them on the probe sequence."""
        from safetensors.torch import save_file

        path = self._scratch / "model.safetensors"
        save_file(trainer_state_dict(model), str(path))
        self.llm.collective_rpc("opd_reload_weights", args=(str(self._scratch),))
        path.unlink()
        self.llm.reset_prefix_cache()
        self._version = weights_version(model)
        self.syncs += 1
        if self.verify and self._probe is not None:
            self.check(model, self._probe)

    def check(self, model, token_ids: Sequence[int]) -> float:
        """Largest |engine - trainer| log-prob over ``token_ids``; raises StaleSamplerWeights past tolerance."""
        engine = self.prompt_logprobs(token_ids)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            dev = next(model.parameters()).device
            ids = torch.tensor([list(token_ids)], device=dev)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            trainer = logp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()
        if was_training:
            model.train()
        err = float((torch.tensor(engine) - trainer).abs().max())
        self.last_probe_error = err
        tolerance = PROBE_TOLERANCE.get(self.dtype, 0.15)
        if not err <= tolerance:
            raise StaleSamplerWeights(
                f"after a weight reload the vLLM sampler's log-probs differ from the trainer's by up to {err:.3g} "
                f"(tolerance {tolerance:g} in {self.dtype}): the engine did not take the new weights; sampling "
                "from it would silently turn OPD off-policy"
            )
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
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        batch_size: int | None = None,
        logprobs: bool = True,
    ) -> list[Sample]:
        """``generation.sample``'s signature: ``n`` completions per prompt, prompt by prompt, sampled by the
        engine after it has taken ``model``'s current weights (``batch_size`` is vLLM's own business)."""
        if self._version is None or weights_version(model) != self._version:
            if self._probe is None and prompts:
                self._probe = list(prompts[0])[:PROBE_TOKENS]
            self.sync(model)
        return self.sample(
            prompts,
            stop_ids=stop_token_ids(tokenizer),
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=int(torch.randint(0, 2**31 - 1, (1,))),
            logprobs=logprobs,
        )

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        stop_ids: Sequence[int],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
        logprobs: bool = True,
    ) -> list[Sample]:
        """Sample with the weights the engine holds now (``__call__`` first brings them up to date)."""
        from vllm import SamplingParams

        greedy = temperature <= 0
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,
                max_tokens=max_new_tokens,
                stop_token_ids=list(stop_ids),
                logprobs=0 if logprobs else None,
                seed=None if seed is None else seed + i * n,
                detokenize=False,
                skip_special_tokens=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        samples: list[Sample] = []
        for prompt, out in zip(prompts, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(c.logprobs[j][t].logprob) for j, t in enumerate(ids)] if logprobs else []
                samples.append(Sample(list(prompt), ids, lps, finished=c.finish_reason == "stop"))
        return samples

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        shutil.rmtree(self._scratch, ignore_errors=True)
