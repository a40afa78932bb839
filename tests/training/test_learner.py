"""The OPD learner's mechanics on untrained tiny Qwen3 models: resume after a kill, refusing to
overwrite checkpoints, masking, the sampler/trainer log-prob agreement, metrics, LoRA and Prometheus.

Nothing here needs a trained model: the models are random, and every check is about bookkeeping that
must hold exactly whatever the weights are.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from opd_runtime import cli, modeling, tinymath
from opd_runtime.distill.learner import micro_batches, run_distill, train_on_samples
from opd_runtime.distill.teacher import LocalTeacher
from opd_runtime.generation import Sample, sample
from opd_runtime.spec import DistillSpec, load_run
from opd_runtime.training import checkpoint
from opd_runtime.training.batches import prompt_ids, right_pad, token_logprobs

from support.numerics import TINY_MODEL_REL, WORLD_LOGPROB_ATOL, assert_close
from support.processes import free_port, opd_cmd, opd_env
from support.runs import write_run

RESUME_STEPS = 20  # long enough that the kill after the first checkpoint lands well before the end
PROMPTS_PER_STEP = 2
DETERMINISTIC_FIELDS = (
    "reverse_kl",
    "entropy",
    "loss",
    "completion_tokens",
    "grad_norm",
    "learning_rate",
    "finished_fraction",
)
# train_on_samples against the same step by hand, in other micro-batches or with another pad id: the tiny
# models' float32 sums in another order (numerics.TINY_MODEL_REL); a lost token or a wrong sign is O(1).
WHY = "the tiny models' float32 sums in another order"
STEP_FIELDS = (
    "step",
    "reverse_kl",
    "entropy",
    "completion_tokens",
    "sample_seconds",
    "teacher_seconds",
    "train_seconds",
    "step_seconds",
)


def quiet(*_args) -> None:
    pass


def metrics_lines(ws: Path) -> list[dict]:
    path = ws / "metrics" / "distill.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def prompts_of_different_lengths(tokenizer, count: int) -> list[list[int]]:
    """Tinymath prompts whose token lengths all differ, so batches are really padded."""
    by_len: dict[int, list[int]] = {}
    for p in tinymath.generate(200, split="test", seed=3):
        ids = prompt_ids(tokenizer, tinymath.chat_messages(p.problem))
        by_len.setdefault(len(ids), ids)
        if len(by_len) == count:
            break
    assert len(by_len) == count, "tinymath prompts of distinct lengths not found"
    return list(by_len.values())


# --- a. / b. / e.: resume after a real kill, and what a finished run leaves behind -------------------


@contextlib.contextmanager
def one_thread():
    """In-process runs use one thread, like the ``OMP_NUM_THREADS=1`` subprocesses, so that the
    floating-point reductions are the same in both and weights can be compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resume_runs(random_models, tmp_path_factory):
    """A CLI run SIGKILLed after its first checkpoint then resumed with --resume, and an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("resume")
    config = write_run(
        tmp / "run.yaml",
        random_models.student,
        random_models.teacher,
        steps=RESUME_STEPS,
        promptsPerStep=PROMPTS_PER_STEP,
        checkpointing={"every": 2, "keep": 2},
    )
    full_ws, killed_ws = tmp / "full", tmp / "killed"
    ckpt_root = killed_ws / "checkpoints" / "distill"
    with open(tmp / "killed.log", "w") as killed_log:
        killed = subprocess.Popen(
            opd_cmd("distill", "--config", str(config), "--workspace", str(killed_ws)),
            env=opd_env(),
            stdout=killed_log,
            stderr=subprocess.STDOUT,
        )

        def kill_after_the_first_checkpoint() -> None:
            deadline = time.monotonic() + 300
            while killed.poll() is None and time.monotonic() < deadline:
                if (ckpt_root / "step-000002" / checkpoint.STATE_FILE).exists() and checkpoint.latest(
                    ckpt_root
                ) is not None:
                    killed.send_signal(signal.SIGKILL)
                    return
                time.sleep(0.002)

        # the killer watches from the start, however long the uninterrupted run below takes
        killer = threading.Thread(target=kill_after_the_first_checkpoint, daemon=True)
        killer.start()
        try:
            # the uninterrupted run, in this process while the other one runs
            with one_thread():
                run_distill(load_run(config), full_ws, log=quiet)
            killer.join(timeout=360)
            killed.wait(timeout=60)
        finally:
            if killed.poll() is None:
                killed.kill()
                killed.wait()
    killed_log_text = (tmp / "killed.log").read_text()
    assert killed.returncode == -signal.SIGKILL, (
        f"the run to be killed exited by itself (rc {killed.returncode}) before the test could kill it; "
        f"raise RESUME_STEPS so the kill lands mid-run:\n{killed_log_text}"
    )
    at_kill = SimpleNamespace(latest=checkpoint.latest(ckpt_root), metrics=metrics_lines(killed_ws))
    assert not (killed_ws / "results" / "distill.json").exists()
    assert not (ckpt_root / "final").exists()
    assert at_kill.latest is not None and at_kill.latest.name != f"step-{RESUME_STEPS:06d}"

    # `opd distill --resume`, in this process (the CLI's own entry point, minus the interpreter start-up)
    out, err = io.StringIO(), io.StringIO()
    with one_thread(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["distill", "--config", str(config), "--workspace", str(killed_ws), "--resume"])
    assert code == 0, out.getvalue() + err.getvalue()
    return SimpleNamespace(
        config=config, full=full_ws, killed=killed_ws, at_kill=at_kill, resumed_output=out.getvalue() + err.getvalue()
    )


def test_resume_after_kill_gives_identical_weights(resume_runs, random_models):
    r = resume_runs
    start = int(r.at_kill.latest.name.split("-")[1])
    assert f"resumed from {r.at_kill.latest}" in r.resumed_output
    assert 2 <= start < RESUME_STEPS

    final_full = weights(r.full / "checkpoints" / "distill" / "final")
    final_resumed = weights(r.killed / "checkpoints" / "distill" / "final")
    initial = weights(random_models.student)
    assert final_full.keys() == final_resumed.keys() == initial.keys()
    for name in final_full:
        assert torch.equal(final_full[name], final_resumed[name]), f"{name} differs after resume"
    # training really moved the weights, so the equality above is not the trivial one
    assert any(not torch.equal(final_full[n], initial[n]) for n in initial)


def test_resumed_metrics_have_one_line_per_step(resume_runs):
    resumed, full = metrics_lines(resume_runs.killed), metrics_lines(resume_runs.full)
    assert [m["step"] for m in resumed] == list(range(1, RESUME_STEPS + 1))
    assert [m["step"] for m in full] == list(range(1, RESUME_STEPS + 1))
    # the resumed steps sampled and scored exactly what the uninterrupted run did
    for a, b in zip(resumed, full):
        assert {k: a[k] for k in DETERMINISTIC_FIELDS} == {k: b[k] for k in DETERMINISTIC_FIELDS}


def test_existing_checkpoints_without_resume_exit_2_and_stay_untouched(resume_runs, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(resume_runs.full, ws)
    before = tree_digest(ws)
    code = cli.main(["distill", "--config", str(resume_runs.config), "--workspace", str(ws)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_CONFIG == 2
    assert "--resume" in err and "already holds checkpoints" in err
    assert tree_digest(ws) == before


def test_metrics_checkpoints_and_results_of_a_finished_run(resume_runs):
    from transformers import AutoModelForCausalLM

    ws = resume_runs.full
    for line in metrics_lines(ws):
        missing = [f for f in STEP_FIELDS if f not in line]
        assert not missing, f"metrics.jsonl line lacks {missing}: {line}"
        assert line["completion_tokens"] > 0 and line["step_seconds"] >= line["train_seconds"] >= 0

    root = ws / "checkpoints" / "distill"
    steps = sorted(p.name for p in root.glob("step-*"))
    assert steps == [f"step-{RESUME_STEPS - 2:06d}", f"step-{RESUME_STEPS:06d}"]  # keep: 2
    assert (root / "latest").read_text().strip() == steps[-1]
    assert not list(root.glob(".*tmp*"))
    for name in steps:
        step = int(name.split("-")[1])
        assert (root / name / "model" / "model.safetensors").is_file()
        assert (root / name / "model" / "tokenizer.json").is_file()
        state = checkpoint.load_state(root / name)
        assert {"optimizer", "scheduler", "rng", "data_position", "step"} <= set(state)
        assert state["step"] == step and state["data_position"] == step * PROMPTS_PER_STEP
        assert state["optimizer"]["state"], "optimizer state (Adam moments) missing"
        assert {"python", "numpy", "torch"} <= set(state["rng"])
    # the last step checkpoint holds the final weights
    last, final = weights(root / steps[-1] / "model"), weights(root / "final")
    assert all(torch.equal(last[k], final[k]) for k in final)

    model, info = AutoModelForCausalLM.from_pretrained(root / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == "qwen3"
    result = json.loads((ws / "results" / "distill.json").read_text())
    assert result["stage"] == "distill" and result["steps"] == RESUME_STEPS
    assert Path(result["final_model"]) == root / "final"
    assert result["reverse_kl_last"] == metrics_lines(ws)[-1]["reverse_kl"]


# --- c. / h.: student == teacher, and the Prometheus exporter ----------------------------------------


@pytest.fixture(scope="module")
def self_distill(random_models, tmp_path_factory):
    """One learner step with the student as its own teacher, exporting metrics on a free port."""
    tmp = tmp_path_factory.mktemp("self")
    port = free_port()
    config = write_run(
        tmp / "run.yaml", random_models.student, random_models.student, steps=1, promptsPerStep=3, metricsPort=port
    )
    result = run_distill(load_run(config), tmp / "ws", log=quiet)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        exposition = resp.read().decode()
    return SimpleNamespace(ws=tmp / "ws", result=result, exposition=exposition)


def test_student_as_its_own_teacher_has_zero_reverse_kl(self_distill):
    (line,) = metrics_lines(self_distill.ws)
    assert line["step"] == 1 and line["completion_tokens"] > 0
    # a mean of per-token differences between two float32 forward passes of one model, each a rounding error
    assert abs(line["reverse_kl"]) < WORLD_LOGPROB_ATOL


def prom_value(exposition: str, name: str) -> float:
    for ln in exposition.splitlines():
        if ln.startswith(name + " ") or ln.startswith(name + "{"):
            return float(ln.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported:\n{exposition}")


def test_prometheus_exporter_serves_the_step_metrics(self_distill):
    text = self_distill.exposition
    (line,) = metrics_lines(self_distill.ws)
    assert "opd_reverse_kl" in text and 'opd_step_phase_seconds{phase="teacher"}' in text
    # the same float, printed and parsed back (the exposition prints repr precision): no kernel involved
    assert prom_value(text, "opd_reverse_kl") == pytest.approx(line["reverse_kl"], abs=1e-12)
    assert prom_value(text, 'opd_step_phase_seconds{phase="teacher"}') == pytest.approx(line["teacher_seconds"])
    assert prom_value(text, "opd_step") == 1
    assert prom_value(text, "opd_completion_tokens") == line["completion_tokens"]
    assert prom_value(text, "opd_total_steps") == 1


# --- c. / d.: train_on_samples directly ---------------------------------------------------------------


@pytest.fixture(scope="module")
def student_and_samples(random_models):
    tok = modeling.load_tokenizer(str(random_models.student))
    model = modeling.load_causal_lm(str(random_models.student), dtype="float32")
    prompts = prompts_of_different_lengths(tok, 3)
    torch.manual_seed(0)
    samples = sample(model, tok, prompts, n=2, max_new_tokens=12)
    assert len({len(s.completion_ids) for s in samples} | {len(s.prompt_ids) for s in samples}) > 1
    return tok, model, samples


def spec(**kw) -> DistillSpec:
    base = dict(prompts={"name": "tinymath"}, prompts_per_step=3, samples_per_prompt=2, micro_batch_size=2)
    return DistillSpec(**{**base, **kw})


def grads_of(model, samples, teacher_lp, cfg, pad_id, teacher=None):
    model.train()
    model.zero_grad(set_to_none=True)
    stats = train_on_samples(model, samples, teacher_lp, cfg, pad_id, teacher)
    grads = {}
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        grads[n] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return stats, grads


@pytest.mark.cpu_kernels
def test_same_model_as_teacher_gives_zero_gradients(random_models, student_and_samples):
    tok, model, samples = student_and_samples
    same = LocalTeacher(modeling.load_causal_lm(str(random_models.student), dtype="float32"))
    other = LocalTeacher(modeling.load_causal_lm(str(random_models.other_student), dtype="float32"))
    cfg = spec()
    stats, grads = grads_of(model, samples, same.score(samples), cfg, tok.pad_token_id)
    assert abs(stats.reverse_kl) < WORLD_LOGPROB_ATOL  # two float32 passes of one model: rounding only
    worst = max(g.abs().max().item() for g in grads.values())
    # the same check with a different teacher does produce gradients: the one above can fail
    stats_o, grads_o = grads_of(model, samples, other.score(samples), cfg, tok.pad_token_id)
    assert abs(stats_o.reverse_kl) > 1e-3
    worst_o = max(g.abs().max().item() for g in grads_o.values())
    assert worst_o > 1e-3
    # The gradient is linear in the per-token advantage: with the student as its own teacher the advantage is
    # a rounding error (below WORLD_LOGPROB_ATOL), with the other teacher it is of the size of its reverse KL.
    bound = worst_o * WORLD_LOGPROB_ATOL / abs(stats_o.reverse_kl)
    assert worst < bound, f"largest gradient {worst:.2e} with the student as its own teacher (bound {bound:.2e})"


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("loss", ["importance_sampling", "ppo", "full_reverse_kl"])
def test_only_completion_tokens_carry_loss(random_models, student_and_samples, loss):
    """train_on_samples (padded, micro-batched) against the loss computed by hand, one unpadded sequence
    at a time over its completion tokens only: gradients, reverse KL and entropy. The pad id must not
    matter either."""
    tok, model, samples = student_and_samples
    teacher = LocalTeacher(modeling.load_causal_lm(str(random_models.other_student), dtype="float32"))
    gen = torch.Generator().manual_seed(1)
    # behaviour log-probs off by some noise so the ratio is not 1 (and PPO clips); arbitrary teacher log-probs
    noisy = [
        Sample(
            s.prompt_ids,
            s.completion_ids,
            [lp + 0.3 * float(torch.randn(1, generator=gen)) for lp in s.logprobs],
            s.finished,
        )
        for s in samples
    ]
    teacher_lp = [[-float(torch.rand(1, generator=gen)) * 6 for _ in s.completion_ids] for s in samples]
    cfg = spec(kl_coef=0.7, loss=loss)
    stats, grads = grads_of(model, noisy, teacher_lp, cfg, tok.pad_token_id, teacher)

    n_tokens = sum(len(s.completion_ids) for s in noisy)
    model.zero_grad(set_to_none=True)
    kl_sum = entropy_sum = 0.0
    for s, t_lp in zip(noisy, teacher_lp):
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        p, c = len(s.prompt_ids), len(s.completion_ids)
        # row k of these predicts completion token k
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)[p - 1 : p + c - 1]
        new_lp = logp.gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1)
        old_lp, t = torch.tensor(s.logprobs), torch.tensor(t_lp)
        adv = -cfg.kl_coef * (old_lp - t)
        ratio = torch.exp(new_lp - old_lp)
        if loss == "importance_sampling":
            objective = (ratio * adv).sum()
        elif loss == "ppo":
            objective = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.ppo_clip, 1 + cfg.ppo_clip) * adv).sum()
        else:
            with torch.no_grad():
                t_logp = torch.log_softmax(teacher.model(input_ids=ids).logits[0].float(), -1)[p - 1 : p + c - 1]
            objective = -(logp.exp() * (logp - t_logp)).sum()
        (-objective / n_tokens).backward()
        kl_sum += float((old_lp - t).sum())
        entropy_sum += float(-(logp.exp() * logp).sum().detach())
    by_hand = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    assert stats.completion_tokens == n_tokens
    assert_close(stats.reverse_kl, kl_sum / n_tokens, rel=TINY_MODEL_REL, why=WHY, what="reverse KL")
    assert_close(stats.entropy, entropy_sum / n_tokens, rel=TINY_MODEL_REL, why=WHY, what="entropy")
    assert max(g.abs().max().item() for g in by_hand.values()) > 1e-4
    for n in grads:
        assert_close(grads[n], by_hand[n], rel=TINY_MODEL_REL, why=WHY, what=f"{n}: gradient differs")

    # another padding id (right padding, masked): identical gradients
    _, grads_pad = grads_of(model, noisy, teacher_lp, cfg, tok.convert_tokens_to_ids("<think>"), teacher)
    for n in grads:
        assert_close(grads[n], grads_pad[n], rel=TINY_MODEL_REL, why=WHY, what=f"{n}: depends on the pad id")


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("loss", ["full_forward_kl", "full_reverse_kl"])
def test_local_teacher_runs_once_per_micro_batch_for_full_kl(random_models, student_and_samples, loss):
    """A local teacher with a full-distribution loss: no separate ``score`` pass; one teacher forward per
    micro-batch gives both its distributions and the sampled tokens' log-probs, and the step is the same
    as with the log-probs scored beforehand."""
    tok, model, samples = student_and_samples
    teacher = LocalTeacher(modeling.load_causal_lm(str(random_models.other_student), dtype="float32"))
    cfg = spec(loss=loss)
    scored = teacher.score(samples)
    teacher.forwards = 0
    stats_a, grads_a = grads_of(model, samples, scored, cfg, tok.pad_token_id, teacher)
    micro = len(micro_batches(samples, cfg))
    assert micro == 3 and teacher.forwards == micro
    teacher.forwards = 0
    stats_b, grads_b = grads_of(model, samples, None, cfg, tok.pad_token_id, teacher)
    assert teacher.forwards == micro  # not one more for scoring
    # the teacher's log-probs scored in other batches: the same sums, perhaps blocked otherwise
    assert_close(stats_b.reverse_kl, stats_a.reverse_kl, rel=TINY_MODEL_REL, why=WHY, what="reverse KL")
    assert abs(stats_a.reverse_kl) > 1e-3
    assert_close(stats_b.loss, stats_a.loss, rel=TINY_MODEL_REL, why=WHY, what="loss")
    for n in grads_a:  # a full-distribution loss takes its gradient from the micro-batch's own forward: exact
        assert torch.equal(grads_a[n], grads_b[n]), n


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("loss", ["importance_sampling", "full_reverse_kl"])
def test_token_budget_micro_batches_leave_the_step_unchanged(random_models, student_and_samples, loss):
    tok, model, samples = student_and_samples
    teacher = LocalTeacher(modeling.load_causal_lm(str(random_models.other_student), dtype="float32"))
    teacher_lp = teacher.score(samples)
    lengths = sorted(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    by_count = spec(loss=loss, micro_batch_size=6)
    by_tokens = spec(loss=loss, micro_batch_size=6, max_tokens_per_micro_batch=2 * lengths[-1])
    groups = micro_batches(samples, by_tokens)
    assert len(micro_batches(samples, by_count)) == 1 and len(groups) >= 3  # the budget really splits the step
    for g in groups:  # rows x longest row within the budget
        assert len(g) * max(len(samples[i].prompt_ids) + len(samples[i].completion_ids) for i in g) <= 2 * lengths[-1]
    stats_a, grads_a = grads_of(model, samples, teacher_lp, by_count, tok.pad_token_id, teacher)
    stats_b, grads_b = grads_of(model, samples, teacher_lp, by_tokens, tok.pad_token_id, teacher)
    assert stats_a.completion_tokens == stats_b.completion_tokens
    for field in ("loss", "reverse_kl", "entropy"):
        assert_close(getattr(stats_b, field), getattr(stats_a, field), rel=TINY_MODEL_REL, why=WHY, what=field)
    for n in grads_a:
        assert_close(grads_a[n], grads_b[n], rel=TINY_MODEL_REL, why=WHY, what=n)


# --- g.: the sampler's behaviour log-probs are the trainer's log-probs --------------------------------


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_a_forward_pass(student_and_samples, temperature):
    tok, model, _ = student_and_samples
    prompts = prompts_of_different_lengths(tok, 3)  # left-padded together by the sampler
    torch.manual_seed(2)
    samples = sample(model, tok, prompts, n=2, temperature=temperature, max_new_tokens=16)
    assert all(len(s.logprobs) == len(s.completion_ids) > 0 for s in samples)
    batch = right_pad([s.prompt_ids for s in samples], [s.completion_ids for s in samples], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    lp_BT = token_logprobs(logits, batch.input_ids_BT, temperature=temperature)
    for i, s in enumerate(samples):
        p = len(s.prompt_ids)
        recomputed = lp_BT[i, p : p + len(s.completion_ids)]
        what = f"sample {i} (prompt {p} tokens): sampler {s.logprobs} vs forward {recomputed.tolist()}"
        assert_close(recomputed, torch.tensor(s.logprobs), rel=TINY_MODEL_REL, why=WHY, what=what)


# --- f.: LoRA ---------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_lora_run_resumes_and_exports_a_merged_model(random_models, tmp_path):
    from transformers import AutoModelForCausalLM

    lora = {"enabled": True, "rank": 4, "alpha": 8.0}
    config = load_run(
        write_run(
            tmp_path / "run.yaml",
            random_models.student,
            random_models.teacher,
            steps=2,
            lora=lora,
            checkpointing={"every": 1, "keep": 2},
        )
    )

    def crash_at_step_2(record):
        if record["step"] == 2:  # logged, not yet checkpointed
            raise Crash

    ws = tmp_path / "ws"
    with pytest.raises(Crash):
        run_distill(config, ws, log=quiet, on_step=crash_at_step_2)
    ckpt = checkpoint.latest(ws / "checkpoints" / "distill")
    assert ckpt is not None and ckpt.name == "step-000001"
    assert (ckpt / "model" / "adapter_config.json").is_file()  # the checkpoint is the adapter
    assert [m["step"] for m in metrics_lines(ws)] == [1, 2]

    logs: list[str] = []
    run_distill(config, ws, resume=True, log=logs.append)
    assert any("resumed from" in ln and "(step 1)" in ln for ln in logs)
    assert [m["step"] for m in metrics_lines(ws)] == [1, 2]

    fresh = tmp_path / "fresh"
    run_distill(config, fresh, log=quiet)

    final = ws / "checkpoints" / "distill" / "final"
    names = {p.name for p in final.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not {n for n in names if n.startswith("adapter")}, names
    _model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    merged, base = weights(final), weights(random_models.student)
    assert merged.keys() == base.keys() and not any("lora" in k for k in merged)
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any("norm" in k or "embed_tokens" in k for k in changed), changed  # LoRA adapts linears only
    # resumed and uninterrupted LoRA runs end with the same merged weights
    uninterrupted = weights(fresh / "checkpoints" / "distill" / "final")
    for k in merged:
        assert torch.equal(merged[k], uninterrupted[k]), f"{k} differs after a LoRA resume"
