"""SFT and the OPD learner as two data-parallel processes under torchrun (gloo, CPU), on the tiny models.

Real ``torchrun --nproc-per-node 2 opd ...`` subprocesses: SFT on two processes ends with the weights one
process gets on the same global batch; OPD on two processes logs the same fields as one process, with
step totals that are the sums of what each rank sampled; a failure on one rank ends the whole run (no
hang), and ``--resume`` continues it to exactly the weights of an uninterrupted two-process run.
Each torchrun start costs several seconds (two interpreters importing torch), so the launches are few.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd_runtime import cli, modeling
from opd_runtime.data_sources import load_prompts
from opd_runtime.distill.learner import run_distill
from opd_runtime.distill.teacher import LocalTeacher
from opd_runtime.generation import sample
from opd_runtime.plan import launcher_argv, stage_command
from opd_runtime.sft.trainer import run_sft
from opd_runtime.spec import load_run, parse_run
from opd_runtime.training import checkpoint
from opd_runtime.training.batches import prompt_ids
from opd_runtime.training.distributed import share_bounds, step_seed
from opd_runtime.training.order import batch_at

from support.numerics import ADAMW_WEIGHTS_REL
from support.processes import free_port, opd_env
from support.runs import run_doc

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
OPD = str(BIN / "opd")
LAUNCH_TIMEOUT_S = 300
OPD_STEPS = 4
OPD_SETTINGS = dict(steps=OPD_STEPS, promptsPerStep=4, samplesPerPrompt=2, checkpointing={"every": 2, "keep": 2})

# Rank 1 fails in its third training pass (step 3, after the step-2 checkpoint); rank 0 is then waiting
# in the gradient all-reduce and must not wait forever.
FAIL_ON_RANK_1 = """
import os, sys
from opd_runtime import cli
from opd_runtime.distill import learner

if os.environ.get("RANK") == "1":
    real, calls = learner.train_on_samples, []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("injected failure on rank 1")
        return real(*args, **kwargs)

    learner.train_on_samples = failing
sys.exit(cli.main(sys.argv[1:]))
"""


def quiet(*_args) -> None:
    pass


@contextlib.contextmanager
def one_thread():
    """Like the torchrun workers (OMP_NUM_THREADS=1), so both sides reduce floats in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torchrun(log: Path, *args: str, program: str = OPD) -> SimpleNamespace:
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            [*TORCHRUN, program, *args], env=opd_env(), stdout=out, stderr=subprocess.STDOUT, timeout=LAUNCH_TIMEOUT_S
        )
    return SimpleNamespace(code=proc.returncode, log=log.read_text(), seconds=time.monotonic() - start)


def metrics_lines(ws: Path, stage: str) -> list[dict]:
    return [json.loads(ln) for ln in (ws / "metrics" / f"{stage}.jsonl").read_text().splitlines() if ln.strip()]


def final_weights(ws: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(ws / "checkpoints" / stage / "final" / "model.safetensors"))


def test_each_rank_gets_a_contiguous_share_and_all_of_the_batch_is_covered():
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            bounds = [share_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_launcher_prefix_for_stage_pods(random_models, tmp_path):
    run = parse_run(run_doc(random_models.student, random_models.teacher))
    assert launcher_argv(1) == ()
    argv = launcher_argv(4) + stage_command(run, "distill", config="/etc/opd/run.yaml", workspace="/ws").argv
    assert argv[:6] == ("python3", "-m", "opd_runtime.launch", "--standalone", "--nproc-per-node=4", "--no-python")
    assert argv[6:8] == ("opd", "distill")


def test_single_process_stages_refuse_to_run_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["eval", "--config", "unused.yaml", "--workspace", "unused"]) == cli.EXIT_BAD_CONFIG
    assert "without torchrun" in capsys.readouterr().err


def test_strategy_auto_shards_full_fine_tuning_on_several_processes_only():
    from opd_runtime.spec import DistillSpec, SftSpec
    from opd_runtime.training.sharding import resolve_strategy, stage_strategy

    assert resolve_strategy("auto", lora=False, world=2) == "fsdp"
    assert resolve_strategy("auto", lora=True, world=8) == "ddp"  # adapters are small: replicate them
    assert resolve_strategy("auto", lora=False, world=1) == "ddp"  # one process: nothing to shard
    assert resolve_strategy("fsdp", lora=False, world=1) == "ddp"
    assert resolve_strategy("ddp", lora=False, world=8) == "ddp"
    prompts = {"name": "tinymath"}
    assert stage_strategy(DistillSpec(prompts=prompts)) == "auto"
    assert stage_strategy(DistillSpec(prompts=prompts, sampler={"backend": "vllm"})) == "ddp"
    with pytest.raises(ValueError, match="LoRA adapter is small"):
        SftSpec(dataset=prompts, strategy="fsdp", lora={"enabled": True})
    with pytest.raises(ValueError, match="vllm sampler"):
        DistillSpec(prompts=prompts, strategy="fsdp", sampler={"backend": "vllm"})


# --- a.: SFT, two processes against one ----------------------------------------------------------------


def test_sft_on_two_processes_gives_the_weights_of_one(random_models, tmp_path):
    """LoRA, packed rows (4D masks) and a batch of 5 traces that the ranks split 3 + 2: the micro-batches
    differ from the single process's, the step's gradient must not."""
    from support.runs import sft_run

    doc = sft_run(
        random_models.student,
        {"name": "tinymath", "maxSamples": 40},
        steps=3,
        batchSize=5,
        lora={"enabled": True, "rank": 4, "alpha": 8.0},
    )
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    with one_thread():
        run_sft(parse_run(doc), tmp_path / "one", log=quiet)
    two = torchrun(tmp_path / "two.log", "sft", "--config", str(config), "--workspace", str(tmp_path / "two"))
    assert two.code == 0, two.log
    print(f"torchrun sft, 2 processes: {two.seconds:.1f}s")

    one_w, two_w, init = (
        final_weights(tmp_path / "one", "sft"),
        final_weights(tmp_path / "two", "sft"),
        load_file(str(random_models.student / "model.safetensors")),
    )
    assert one_w.keys() == two_w.keys() == init.keys()
    worst = max(float((one_w[k] - two_w[k]).abs().max() / one_w[k].abs().max().clamp_min(1e-12)) for k in one_w)
    moved = max(float((one_w[k] - init[k]).abs().max()) for k in one_w)
    print(f"largest relative weight difference, 1 vs 2 processes: {worst:.2e} (training moved weights by {moved:.2e})")
    assert worst < ADAMW_WEIGHTS_REL and moved > 1e-3

    one_m, two_m = metrics_lines(tmp_path / "one", "sft"), metrics_lines(tmp_path / "two", "sft")
    assert [m["step"] for m in two_m] == [1, 2, 3]  # rank 0 alone writes the file
    for a, b in zip(one_m, two_m):
        assert a.keys() == b.keys()
        assert (a["completion_tokens"], a["tokens"]) == (b["completion_tokens"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    one_r = json.loads((tmp_path / "one" / "results" / "sft.json").read_text())
    two_r = json.loads((tmp_path / "two" / "results" / "sft.json").read_text())
    assert one_r.keys() == two_r.keys()
    assert two.log.count("split over 2 processes") == 1 and two.log.count('"stage": "sft"') == 1


# --- b. / c.: OPD on two processes; a failing rank; resume ----------------------------------------------


def opd_config(path: Path, random_models, *, port: int = 0) -> Path:
    path.write_text(
        yaml.safe_dump(
            run_doc(random_models.student, random_models.teacher, metricsPort=port, **OPD_SETTINGS), sort_keys=False
        )
    )
    return path


@pytest.fixture(scope="module")
def opd_runs(random_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opd-dist")
    with one_thread():
        run_distill(load_run(opd_config(tmp / "one.yaml", random_models)), tmp / "one", log=quiet)
    # a metrics port: a second rank serving Prometheus too would fail on the taken port
    two = torchrun(
        tmp / "two.log",
        "distill",
        "--config",
        str(opd_config(tmp / "two.yaml", random_models, port=free_port())),
        "--workspace",
        str(tmp / "two"),
    )
    assert two.code == 0, two.log
    return SimpleNamespace(tmp=tmp, one=tmp / "one", two=tmp / "two", two_run=two)


def test_distill_on_two_processes_logs_what_one_process_logs(opd_runs):
    one, two = metrics_lines(opd_runs.one, "distill"), metrics_lines(opd_runs.two, "distill")
    assert [m["step"] for m in two] == list(range(1, OPD_STEPS + 1))
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        # the global batch: 4 prompts x 2 samples over both ranks
        assert b["completion_tokens"] / b["mean_completion_length"] == pytest.approx(4 * 2)
        assert 0 <= b["finished_fraction"] <= 1 and b["completion_tokens"] > 0
    one_r = json.loads((opd_runs.one / "results" / "distill.json").read_text())
    two_r = json.loads((opd_runs.two / "results" / "distill.json").read_text())
    assert one_r.keys() == two_r.keys() and two_r["steps"] == OPD_STEPS
    root = opd_runs.two / "checkpoints" / "distill"
    # the checkpoints, and the spec fingerprint they were written under (written once, by rank 0)
    assert sorted(p.name for p in root.iterdir()) == [
        "final",
        "latest",
        "spec-fingerprint.json",
        "step-000002",
        "step-000004",
    ]
    assert opd_runs.two_run.log.count('"stage": "distill"') == 1  # one summary, from rank 0
    print(f"torchrun distill, 2 processes, {OPD_STEPS} steps: {opd_runs.two_run.seconds:.1f}s")


def test_distill_step_totals_are_the_sums_of_the_ranks_shares(opd_runs, random_models):
    """Step 1 again, rank by rank in this process: each rank's half of the prompts, sampled with its own
    seed; the logged tokens and reverse KL are those of the union."""
    run = load_run(opd_runs.tmp / "two.yaml")
    cfg = run.spec.distill
    tok = modeling.load_tokenizer(str(random_models.student))
    student = modeling.load_causal_lm(str(random_models.student), dtype="float32")
    teacher = LocalTeacher(modeling.load_causal_lm(str(random_models.teacher), dtype="float32"))
    batch = batch_at(load_prompts(cfg.prompts, opd_runs.two), 0, cfg.prompts_per_step, cfg.seed)
    tokens, kl_sum, finished, shares = 0, 0.0, 0, []
    with one_thread():
        for rank in (0, 1):
            start, end = share_bounds(len(batch), rank, 2)
            shares.append([r.id for r in batch[start:end]])
            torch.manual_seed(step_seed(cfg.seed, 0, rank))
            samples = sample(
                student,
                tok,
                [prompt_ids(tok, r.messages) for r in batch[start:end]],
                n=cfg.samples_per_prompt,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.sampler.batch_size,
            )
            for s, t_lp in zip(samples, teacher.score(samples)):
                tokens += len(s.completion_ids)
                kl_sum += sum(a - b for a, b in zip(s.logprobs, t_lp))
                finished += s.finished
    assert len(shares[0]) == len(shares[1]) == 2 and not set(shares[0]) & set(shares[1])
    first = metrics_lines(opd_runs.two, "distill")[0]
    assert first["completion_tokens"] == tokens
    assert first["reverse_kl"] == pytest.approx(kl_sum / tokens, rel=1e-4, abs=1e-6)
    assert first["finished_fraction"] == finished / 8


def test_a_failing_rank_ends_the_run_and_resume_continues_it_exactly(opd_runs, random_models, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    config = opd_config(tmp_path / "run.yaml", random_models)
    ws = tmp_path / "ws"
    failed = torchrun(
        tmp_path / "failed.log", "distill", "--config", str(config), "--workspace", str(ws), program=str(script)
    )
    assert failed.code != 0 and "injected failure on rank 1" in failed.log, failed.log
    print(f"torchrun with a failing rank ended after {failed.seconds:.1f}s (exit {failed.code})")
    latest = checkpoint.latest(ws / "checkpoints" / "distill")
    assert latest is not None and latest.name == "step-000002"
    assert not (ws / "results" / "distill.json").exists()

    resumed = torchrun(tmp_path / "resumed.log", "distill", "--config", str(config), "--workspace", str(ws), "--resume")
    assert resumed.code == 0, resumed.log
    assert "resumed from" in resumed.log and "(step 2)" in resumed.log
    assert [m["step"] for m in metrics_lines(ws, "distill")] == list(range(1, OPD_STEPS + 1))
    a, b = final_weights(ws, "distill"), final_weights(opd_runs.two, "distill")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the resumed and the uninterrupted run"
    deterministic = ("reverse_kl", "entropy", "loss", "completion_tokens", "grad_norm", "finished_fraction")
    for x, y in zip(metrics_lines(ws, "distill"), metrics_lines(opd_runs.two, "distill")):
        assert {k: x[k] for k in deterministic} == {k: y[k] for k in deterministic}


def test_bad_configuration_keeps_exit_code_2_through_the_launcher(opd_runs, random_models):
    """Starting over a workspace with checkpoints and no --resume is a "do not retry" error on every rank;
    plain torchrun would report 1, ``opd_runtime.launch`` (the stage pods' prefix) reports 2."""
    run = load_run(opd_runs.tmp / "two.yaml")
    argv = stage_command(
        run, "distill", config=str(opd_runs.tmp / "two.yaml"), workspace=str(opd_runs.two), program=OPD
    ).argv
    argv = tuple(a for a in argv if a != "--resume")
    before = sorted(p.name for p in (opd_runs.two / "checkpoints" / "distill").iterdir())
    proc = subprocess.run(
        [*launcher_argv(2, python=sys.executable), *argv],
        env=opd_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert proc.returncode == cli.EXIT_BAD_CONFIG, proc.stdout + proc.stderr
    assert "already holds checkpoints" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (opd_runs.two / "checkpoints" / "distill").iterdir()) == before


# --- d.: FSDP (full fine-tuning sharded over two processes), one process; a killed rank; resume ---------

FSDP_STEPS = 4

# Rank 1 kills itself (SIGKILL: no cleanup, no exception handler) in its first micro-batch of step 3,
# after the step-2 checkpoint; torchrun then tears down rank 0.
KILL_RANK_1 = """
import os, signal, sys
from opd_runtime import cli
from opd_runtime.sft import trainer

if os.environ.get("RANK") == "1":
    real, calls = trainer.micro_batch_nll, []

    def killed(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2 * {per_step} + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    trainer.micro_batch_nll = killed
sys.exit(cli.main(sys.argv[1:]))
"""


def fsdp_sft_doc(random_models) -> dict:
    """Full fine-tuning (FSDP shards only that), 5 traces a step split 3 + 2 (micro-batches of 2: rank 0
    runs 2 passes, rank 1 one real one and one zero-weight pass)."""
    from support.runs import sft_run

    return sft_run(
        random_models.student,
        {"name": "tinymath", "maxSamples": 40},
        steps=FSDP_STEPS,
        batchSize=5,
        microBatchSize=2,
        strategy="fsdp",
        optimizer={"learningRate": 1e-3, "warmupSteps": 0, "schedule": "constant"},
    )


@pytest.fixture(scope="module")
def fsdp_runs(random_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    doc = fsdp_sft_doc(random_models)
    config = tmp / "sft.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    with one_thread():
        run_sft(parse_run(doc), tmp / "one", log=quiet)
    two = torchrun(tmp / "two.log", "sft", "--config", str(config), "--workspace", str(tmp / "two"))
    assert two.code == 0, two.log
    return SimpleNamespace(tmp=tmp, config=config, one=tmp / "one", two=tmp / "two", two_run=two)


def test_fsdp_on_two_processes_gives_the_weights_of_one(fsdp_runs, random_models):
    print(f"torchrun sft under FSDP, 2 processes, {FSDP_STEPS} steps: {fsdp_runs.two_run.seconds:.1f}s")
    one_w, two_w = final_weights(fsdp_runs.one, "sft"), final_weights(fsdp_runs.two, "sft")
    init = load_file(str(random_models.student / "model.safetensors"))
    assert one_w.keys() == two_w.keys() == init.keys()  # the usual Hugging Face layout, gathered on rank 0
    worst = max(float((one_w[k] - two_w[k]).abs().max() / one_w[k].abs().max().clamp_min(1e-12)) for k in one_w)
    moved = max(float((one_w[k] - init[k]).abs().max()) for k in one_w)
    print(
        f"largest relative weight difference, 1 process vs 2 FSDP processes: {worst:.2e} "
        f"(training moved weights by {moved:.2e})"
    )
    assert worst < ADAMW_WEIGHTS_REL and moved > 1e-4
    for a, b in zip(metrics_lines(fsdp_runs.one, "sft"), metrics_lines(fsdp_runs.two, "sft")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        # the norm of the DTensor gradient shards is the norm of the whole gradient
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # sharded checkpoints: the model and optimizer shards of both ranks, no full copy
    step = fsdp_runs.two / "checkpoints" / "sft" / "step-000004"
    assert (step / "dcp" / ".metadata").is_file() and len(list((step / "dcp").glob("*.distcp"))) == 2
    assert not (step / "model").exists()


def test_fsdp_resumes_exactly_after_a_killed_rank(fsdp_runs, tmp_path):
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1.replace("{per_step}", "1"))  # rank 1 has 2 of the 5 traces: 1 micro-batch
    ws = tmp_path / "ws"
    killed = torchrun(
        tmp_path / "killed.log", "sft", "--config", str(fsdp_runs.config), "--workspace", str(ws), program=str(script)
    )
    assert killed.code != 0, killed.log
    latest = checkpoint.latest(ws / "checkpoints" / "sft")
    assert latest is not None and latest.name == "step-000002"
    assert not (ws / "results" / "sft.json").exists()

    resumed = torchrun(
        tmp_path / "resumed.log", "sft", "--config", str(fsdp_runs.config), "--workspace", str(ws), "--resume"
    )
    assert resumed.code == 0, resumed.log
    assert "(step 2)" in resumed.log
    a, b = final_weights(ws, "sft"), final_weights(fsdp_runs.two, "sft")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the resumed and the uninterrupted run"
    for x, y in zip(metrics_lines(ws, "sft"), metrics_lines(fsdp_runs.two, "sft")):
        assert (x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"])


def test_a_sharded_checkpoint_resumes_on_one_process(fsdp_runs, random_models, tmp_path):
    """DCP reshards on load: the 2-process run's step-2 checkpoint, continued by a single process, ends
    where the 2-process run ended (float tolerance: the reductions differ)."""
    import shutil

    ws = tmp_path / "ws"
    root = ws / "checkpoints" / "sft"
    root.mkdir(parents=True)
    shutil.copytree(fsdp_runs.two / "checkpoints" / "sft" / "step-000002", root / "step-000002")
    (root / "latest").write_text("step-000002\n")
    with one_thread():
        run_sft(parse_run(fsdp_sft_doc(random_models)), ws, resume=True, log=quiet)
    a, b = final_weights(ws, "sft"), final_weights(fsdp_runs.two, "sft")
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst < ADAMW_WEIGHTS_REL


def test_distill_under_fsdp_samples_and_steps_as_ddp_does(opd_runs, random_models, tmp_path):
    """The OPD learner sharded: the hf sampler's generate runs with synced_gpus (a rank whose sequences
    ended keeps joining the all-gathers) and draws exactly what the data-parallel run drew, and the
    first step's loss and gradient norm match it within float tolerance."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        yaml.safe_dump(
            run_doc(random_models.student, random_models.teacher, strategy="fsdp", **OPD_SETTINGS), sort_keys=False
        )
    )
    fsdp = torchrun(tmp_path / "fsdp.log", "distill", "--config", str(config), "--workspace", str(tmp_path / "ws"))
    assert fsdp.code == 0, fsdp.log
    print(f"torchrun distill under FSDP, 2 processes, {OPD_STEPS} steps: {fsdp.seconds:.1f}s")
    ddp_m, fsdp_m = metrics_lines(opd_runs.two, "distill"), metrics_lines(tmp_path / "ws", "distill")
    assert [m["step"] for m in fsdp_m] == list(range(1, OPD_STEPS + 1))
    first_ddp, first_fsdp = ddp_m[0], fsdp_m[0]
    assert first_fsdp["completion_tokens"] == first_ddp["completion_tokens"]  # the same samples
    assert first_fsdp["reverse_kl"] == pytest.approx(first_ddp["reverse_kl"], rel=1e-6)
    assert first_fsdp["loss"] == pytest.approx(first_ddp["loss"], rel=1e-4, abs=1e-7)
    assert first_fsdp["grad_norm"] == pytest.approx(first_ddp["grad_norm"], rel=1e-4)
    assert (tmp_path / "ws" / "checkpoints" / "distill" / "step-000004" / "dcp" / ".metadata").is_file()
    assert final_weights(tmp_path / "ws", "distill").keys() == final_weights(opd_runs.two, "distill").keys()


def test_a_one_process_checkpoint_resumes_under_fsdp(fsdp_runs, random_models, tmp_path):
    """The other direction: the single process's step-2 checkpoint (full weights, unsharded AdamW state),
    continued by two FSDP processes, ends where the two-process run ended (float tolerance)."""
    import shutil

    ws = tmp_path / "ws"
    root = ws / "checkpoints" / "sft"
    root.mkdir(parents=True)
    shutil.copytree(fsdp_runs.one / "checkpoints" / "sft" / "step-000002", root / "step-000002")
    (root / "latest").write_text("step-000002\n")
    resumed = torchrun(
        tmp_path / "resumed.log", "sft", "--config", str(fsdp_runs.config), "--workspace", str(ws), "--resume"
    )
    assert resumed.code == 0, resumed.log
    assert "(step 2)" in resumed.log
    a, b = final_weights(ws, "sft"), final_weights(fsdp_runs.two, "sft")
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst < ADAMW_WEIGHTS_REL
