"""``opd run``: a whole DistillationRun on one machine, with the pod commands, resume and a report.

Runs on the untrained random models (``random_models``: mechanics, not learning): SFT -> OPD -> eval as real
subprocesses, an interrupted run continued with --resume, a failing stage, and bad files rejected before
torch loads. Runs that get signals start with SIGINT ignored, as every background job of a script does,
so they show that ``opd run`` and its stages install their own handlers whatever started the suite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opd_runtime.plan import stage_command
from opd_runtime.runner import LOCK_FILE
from opd_runtime.spec import load_run

from support.processes import opd_cmd, opd_env
from support.runs import write_run


def run_file(tmp_path: Path, world, *, distill_steps: int = 3, sft_dataset: dict | None = None) -> Path:
    doc = {
        "apiVersion": "opd.dev/v1alpha1",
        "kind": "DistillationRun",
        "metadata": {"name": "mini"},
        "spec": {
            "student": {"model": str(world.student), "dtype": "float32"},
            "teacher": {"model": str(world.teacher), "dtype": "float32", "backend": "vllm-server"},
            "sft": {
                "dataset": sft_dataset or {"name": "tinymath", "maxSamples": 32},
                "steps": 3,
                "batchSize": 8,
                "microBatchSize": 8,
                "maxSeqLength": 128,
                "checkpointing": {"every": 1, "keep": 1},
                "resources": {"gpus": 0},
            },
            "distill": {
                "prompts": {"name": "tinymath", "maxSamples": 64},
                "steps": distill_steps,
                "promptsPerStep": 2,
                "samplesPerPrompt": 2,
                "microBatchSize": 4,
                "maxNewTokens": 12,
                "checkpointing": {"every": 1, "keep": 1},
                "metricsPort": 0,
                "resources": {"gpus": 0},
            },
            "eval": {
                "datasets": [{"name": "tinymath", "split": "test", "maxSamples": 6, "kind": "aime"}],
                "targets": ["student", "sft", "distill", "teacher"],
                "samplesPerProblem": 1,
                "temperature": 0.0,
                "maxNewTokens": 12,
                "resources": {"gpus": 0},
            },
        },
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def distill_run_file(tmp_path: Path, world, *, distill_steps: int) -> Path:
    """A run of OPD and eval only (no SFT): what the signal tests stop in the middle of OPD."""
    doc = yaml.safe_load(run_file(tmp_path, world, distill_steps=distill_steps).read_text())
    doc["spec"].pop("sft")
    doc["spec"]["eval"]["targets"] = ["student", "distill"]
    path = tmp_path / "distill-only.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def opd_run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd_runtime", "run", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=opd_env(),
        timeout=600,
        **kw,
    )


def metric_steps(workdir: Path, stage: str) -> list[int]:
    lines = (workdir / "metrics" / f"{stage}.jsonl").read_text().splitlines()
    return [json.loads(ln)["step"] for ln in lines if ln.strip()]


def ignore_sigint() -> None:
    """``preexec_fn``: start with SIGINT ignored, as a background job of a non-interactive shell does (Python
    then installs no KeyboardInterrupt handler of its own)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_run(src: Path, workdir: Path) -> subprocess.Popen:
    """``opd run`` in the background, in its own session (a terminal's foreground job), SIGINT ignored."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "opd_runtime",
            "run",
            str(src),
            "--workspace",
            str(workdir),
            "--teacher",
            "local",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=opd_env(),
        start_new_session=True,
        preexec_fn=ignore_sigint,
    )


def wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, step: int, timeout: float = 300) -> None:
    """Until ``ckpt`` holds step ``step`` (or a later one); fails if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and any(p.name.startswith("step-") and p.name >= f"step-{step:06d}" for p in ckpt.iterdir()):
            return
        time.sleep(0.1)
    out, err = ("", "") if proc.poll() is None else proc.communicate()
    pytest.fail(f"no {ckpt.name} checkpoint {step} while the process ran (exit {proc.poll()}):\n{out}{err}")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent PID) from /proc/PID/stat; None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    return [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and (_stat(int(p.name)) or ("", 0))[1] == pid
    ]


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child that nobody has reaped yet counts as gone)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


@pytest.mark.slow  # a whole SFT -> OPD -> eval run: minutes on 2 cores
def test_run_executes_every_stage_with_the_pod_commands_and_writes_a_report(random_models, tmp_path):
    src = run_file(tmp_path, random_models)
    workdir = tmp_path / "work"
    proc = opd_run(str(src), "--workspace", str(workdir), "--teacher", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scored in-process" in proc.stdout

    # each stage ran exactly the command the operator would put in a pod (here: local paths)
    run = load_run(workdir / "run.yaml")
    assert run.spec.teacher.backend == "local"  # the choice is recorded in the file the stages read
    for stage in ("sft", "distill", "eval"):
        expected = stage_command(
            run,
            stage,
            config=str(workdir / "run.yaml"),
            workspace=str(workdir),
            program=str(Path(sys.executable).parent / "opd"),
        )
        first_line = (workdir / "logs" / f"{stage}.log").read_text().splitlines()[0]
        assert first_line == f"$ {expected.shell()}"
        assert (workdir / "results" / f"{stage}.json").exists()
    assert metric_steps(workdir, "sft") == [1, 2, 3]
    assert metric_steps(workdir, "distill") == [1, 2, 3]

    report = (workdir / "report.md").read_text()
    for title in ("student before SFT", "after SFT", "after OPD", "teacher"):
        assert f"| {title} | tinymath |" in report
        assert title in proc.stdout  # the terminal table
    assert "Reverse KL" in report and "OPD reverse KL" in proc.stdout
    for png in ("reverse_kl.png", "sft_loss.png", "accuracy.png"):
        data = (workdir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    state = json.loads((workdir / "run-state.json").read_text())["stages"]
    assert set(state) == {"sft", "distill", "eval"}
    assert all(s["outcome"] == "succeeded" and s["seconds"] > 0 for s in state.values())
    for stage in ("sft", "distill", "eval"):  # the Stages table: wall time, attempts, a compute estimate
        assert re.search(rf"^\| {stage} \| \d+ s \| 1 \| \d[\d.]*(e[+-]\d+)? [GTP]?FLOP \|$", report, re.M), report

    # running again without --resume refuses to overwrite; with --resume everything is skipped
    again = opd_run(str(src), "--workspace", str(workdir), "--teacher", "local")
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = opd_run(str(src), "--workspace", str(workdir), "--teacher", "local", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert all(f"[{s}] already finished" in resumed.stdout for s in ("sft", "distill", "eval"))


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_finished_stages(random_models, tmp_path):
    """Ctrl-C stops the run with 130 even though it started with SIGINT ignored; --resume continues it."""
    src = run_file(tmp_path, random_models, distill_steps=40)
    doc = yaml.safe_load(src.read_text())
    doc["spec"]["eval"]["targets"] = ["distill"]  # eval is not what is resumed here; one model is enough
    src.write_text(yaml.safe_dump(doc, sort_keys=False))
    workdir = tmp_path / "work"
    proc = start_run(src, workdir)
    wait_for_checkpoint(proc, workdir / "checkpoints" / "distill", 3)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert f"opd run {src} --workspace {workdir} --resume" in err
    assert not (workdir / "results" / "distill.json").exists()
    sft_result = (workdir / "results" / "sft.json").stat().st_mtime_ns
    sft_metrics = (workdir / "metrics" / "sft.jsonl").read_text()
    interrupted_at = max(metric_steps(workdir, "distill"))

    resumed = opd_run(str(src), "--workspace", str(workdir), "--teacher", "local", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[sft] already finished" in resumed.stdout
    assert (workdir / "results" / "sft.json").stat().st_mtime_ns == sft_result
    assert (workdir / "metrics" / "sft.jsonl").read_text() == sft_metrics
    assert metric_steps(workdir, "distill") == list(range(1, 41))  # continued, no step twice
    assert interrupted_at < 40
    assert "distill: resumed from" in (workdir / "logs" / "distill.log").read_text()
    assert (workdir / "results" / "eval.json").exists() and (workdir / "report.md").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_the_run_as_ctrl_c_does_and_the_workdir_is_locked(random_models, tmp_path, sig):
    """`kill`, `timeout`, a cancelled CI job (SIGTERM) or a closed terminal (SIGHUP): the stage stops between
    steps as on Ctrl-C, no stage is left running, and a second run on the workdir is refused meanwhile."""
    src = distill_run_file(tmp_path, random_models, distill_steps=500)
    workdir = tmp_path / "work"
    proc = start_run(src, workdir)
    wait_for_checkpoint(proc, workdir / "checkpoints" / "distill", 1)
    stages = children(proc.pid)
    assert len(stages) == 1 and running(stages[0])

    second = opd_run(str(src), "--workspace", str(workdir), "--teacher", "local", "--resume")
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"another `opd run` (PID {proc.pid}) is running in it" in second.stderr
    assert proc.poll() is None  # the first run went on

    os.kill(proc.pid, sig)  # the run's process only, as kill and timeout do
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out + err
    assert f"Continue with: opd run {src} --workspace {workdir} --resume" in err
    assert not running(stages[0])
    distill_log = (workdir / "logs" / "distill.log").read_text()
    assert "interrupted; the workspace keeps the last checkpoint" in distill_log  # stopped by its SIGINT
    assert json.loads((workdir / "run-state.json").read_text())["stages"]["distill"]["outcome"] == "interrupted"
    assert not (workdir / "results" / "distill.json").exists()


def test_a_killed_run_takes_its_stage_with_it_and_frees_the_workdir(random_models, tmp_path):
    """kill -9 of `opd run` (no chance to clean up): the kernel's parent-death signal ends the stage."""
    src = distill_run_file(tmp_path, random_models, distill_steps=500)
    workdir = tmp_path / "work"
    proc = start_run(src, workdir)
    wait_for_checkpoint(proc, workdir / "checkpoints" / "distill", 1)
    stages = children(proc.pid)
    assert len(stages) == 1 and running(stages[0])
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while running(stages[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(stages[0]), f"stage process {stages[0]} still runs after its `opd run` was killed"
    import fcntl

    with open(workdir / LOCK_FILE) as lock:  # the lock went with the killed run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_stage_started_with_sigint_ignored_still_stops_on_sigint(random_models, tmp_path):
    """`opd distill` run by hand or by a script in the background: Ctrl-C stops it with 130."""
    config = write_run(tmp_path / "run.yaml", random_models.student, random_models.teacher, steps=500)
    ws = tmp_path / "ws"
    proc = subprocess.Popen(
        opd_cmd("distill", "--config", str(config), "--workspace", str(ws)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=opd_env(),
        start_new_session=True,
        preexec_fn=ignore_sigint,
    )
    wait_for_checkpoint(proc, ws / "checkpoints" / "distill", 1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert "interrupted; the workspace keeps the last checkpoint" in err
    assert not (ws / "results" / "distill.json").exists()


def test_failed_stage_stops_the_run_with_its_log_tail_and_the_resume_command(random_models, tmp_path):
    src = run_file(tmp_path, random_models, sft_dataset={"path": str(tmp_path / "missing.jsonl")})
    workdir = tmp_path / "work"
    proc = opd_run(str(src), "--workspace", str(workdir), "--teacher", "local")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # a config error: retrying would not help
    assert "stage sft failed" in proc.stderr
    assert "missing.jsonl" in proc.stderr  # the stage's own error, from its log tail
    assert f"opd run {src} --workspace {workdir} --resume" in proc.stderr
    assert not (workdir / "metrics" / "distill.jsonl").exists()


BAD = {
    "typo": (
        lambda s: s["distill"].update(promptsPerStp=8),
        "spec.distill.promptsPerStp",
        "did you mean `promptsPerStep`?",
    ),
    "negative lr": (
        lambda s: s["distill"].update(optimizer={"learningRate": -1}),
        "spec.distill.optimizer.learningRate",
        "greater than 0",
    ),
    "no teacher": (lambda s: s.pop("teacher"), "spec.teacher", "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_run_file_fails_before_torch_loads(random_models, tmp_path, case):
    mutate, field, hint = BAD[case]
    doc = yaml.safe_load(run_file(tmp_path, random_models).read_text())
    mutate(doc["spec"])
    src = tmp_path / "bad.yaml"
    src.write_text(yaml.safe_dump(doc))
    code = (
        "import sys\nfrom opd_runtime.cli import main\n"
        f"rc = main(['run', {str(src)!r}, '--workspace', {str(tmp_path / 'w')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=opd_env(), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert field in proc.stderr and hint in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was written


@pytest.mark.vllm
def test_run_serves_the_teacher_with_vllm_and_stops_it_after_opd(random_models, tmp_path):
    """`--teacher vllm`: `opd serve-teacher` (real vLLM) runs beside OPD, which scores over HTTP."""
    doc = yaml.safe_load(run_file(tmp_path, random_models, distill_steps=2).read_text())
    doc["spec"].pop("sft")
    doc["spec"]["eval"]["targets"] = ["distill"]
    doc["spec"]["teacher"]["serving"] = {"maxModelLen": 256, "gpuMemoryUtilization": 0.1}
    src = tmp_path / "vllm.yaml"
    src.write_text(yaml.safe_dump(doc, sort_keys=False))
    workdir = tmp_path / "work"
    proc = opd_run(str(src), "--workspace", str(workdir), "--teacher", "vllm")
    assert proc.returncode == 0, (
        proc.stdout + proc.stderr + "\n" + (workdir / "logs" / "teacher.log").read_text()[-3000:]
    )
    assert "teacher: served by vLLM" in proc.stdout
    assert "[teacher] ready at http://127.0.0.1:" in proc.stdout
    url = proc.stdout.split("[teacher] ready at ")[1].split()[0]
    distill_log = (workdir / "logs" / "distill.log").read_text()
    assert distill_log.splitlines()[0].endswith(f"--resume --teacher-url {url}")
    assert metric_steps(workdir, "distill") == [1, 2]
    # the server is gone once OPD finished (eval does not need it)
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/v1/models", timeout=2)
    assert "teacher" in json.loads((workdir / "run-state.json").read_text())["stages"]
