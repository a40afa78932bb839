"""``opd run``: a whole DistillationRun on one machine, with the pod commands, resume and a report.

Runs on the untrained tiny models of conftest (mechanics, not learning): SFT -> OPD -> eval as real
subprocesses, an interrupted run continued with --resume, a failing stage, and bad files rejected before
torch loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import opd_env
from opd_runtime.plan import stage_command
from opd_runtime.spec import load_run


def run_file(tmp_path: Path, world, *, distill_steps: int = 3, sft_dataset: dict | None = None) -> Path:
    doc = {
        "apiVersion": "opd.dev/v1alpha1", "kind": "DistillationRun", "metadata": {"name": "mini"},
        "spec": {
            "student": {"model": str(world.student), "dtype": "float32"},
            "teacher": {"model": str(world.teacher), "dtype": "float32", "backend": "vllm-server"},
            "sft": {"dataset": sft_dataset or {"name": "tinymath", "maxSamples": 32}, "steps": 3,
                    "batchSize": 8, "microBatchSize": 8, "maxSeqLength": 128,
                    "checkpointing": {"every": 1, "keep": 1}, "resources": {"gpus": 0}},
            "distill": {"prompts": {"name": "tinymath", "maxSamples": 64}, "steps": distill_steps,
                        "promptsPerStep": 2, "samplesPerPrompt": 2, "microBatchSize": 4, "maxNewTokens": 12,
                        "checkpointing": {"every": 1, "keep": 1}, "metricsPort": 0, "resources": {"gpus": 0}},
            "eval": {"datasets": [{"name": "tinymath", "split": "test", "maxSamples": 6, "kind": "aime"}],
                     "targets": ["student", "sft", "distill", "teacher"], "samplesPerProblem": 1,
                     "temperature": 0.0, "maxNewTokens": 12, "resources": {"gpus": 0}},
        },
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def opd_run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opd_runtime", "run", *args, "--no-progress"],
                          capture_output=True, text=True, env=opd_env(), timeout=600, **kw)


def metric_steps(workdir: Path, stage: str) -> list[int]:
    lines = (workdir / "metrics" / f"{stage}.jsonl").read_text().splitlines()
    return [json.loads(ln)["step"] for ln in lines if ln.strip()]


def test_run_executes_every_stage_with_the_pod_commands_and_writes_a_report(tiny_world, tmp_path):
    src = run_file(tmp_path, tiny_world)
    workdir = tmp_path / "work"
    proc = opd_run(str(src), "--workdir", str(workdir), "--teacher", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scored in-process" in proc.stdout

    # each stage ran exactly the command the operator would put in a pod (here: local paths)
    run = load_run(workdir / "run.yaml")
    assert run.spec.teacher.backend == "local"  # the choice is recorded in the file the stages read
    for stage in ("sft", "distill", "eval"):
        expected = stage_command(run, stage, config=str(workdir / "run.yaml"), workspace=str(workdir),
                                 program=str(Path(sys.executable).parent / "opd"))
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
    assert "GFLOP" in report or "FLOP" in report

    # running again without --resume refuses to overwrite; with --resume everything is skipped
    again = opd_run(str(src), "--workdir", str(workdir), "--teacher", "local")
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = opd_run(str(src), "--workdir", str(workdir), "--teacher", "local", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert all(f"[{s}] already finished" in resumed.stdout for s in ("sft", "distill", "eval"))


def test_interrupted_run_resumes_without_redoing_finished_stages(tiny_world, tmp_path):
    src = run_file(tmp_path, tiny_world, distill_steps=40)
    workdir = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "opd_runtime", "run", str(src), "--workdir", str(workdir),
                             "--teacher", "local", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=opd_env(), start_new_session=True)
    ckpt = workdir / "checkpoints" / "distill"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and any(p.name.startswith("step-") and p.name >= "step-000003" for p in ckpt.iterdir()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stderr.read()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert f"opd run {src} --workdir {workdir} --resume" in err
    assert not (workdir / "results" / "distill.json").exists()
    sft_result = (workdir / "results" / "sft.json").stat().st_mtime_ns
    sft_metrics = (workdir / "metrics" / "sft.jsonl").read_text()
    interrupted_at = max(metric_steps(workdir, "distill"))

    resumed = opd_run(str(src), "--workdir", str(workdir), "--teacher", "local", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[sft] already finished" in resumed.stdout
    assert (workdir / "results" / "sft.json").stat().st_mtime_ns == sft_result
    assert (workdir / "metrics" / "sft.jsonl").read_text() == sft_metrics
    assert metric_steps(workdir, "distill") == list(range(1, 41))  # continued, no step twice
    assert interrupted_at < 40
    assert "distill: resumed from" in (workdir / "logs" / "distill.log").read_text()
    assert (workdir / "results" / "eval.json").exists() and (workdir / "report.md").exists()


def test_failed_stage_stops_the_run_with_its_log_tail_and_the_resume_command(tiny_world, tmp_path):
    src = run_file(tmp_path, tiny_world, sft_dataset={"path": str(tmp_path / "missing.jsonl")})
    workdir = tmp_path / "work"
    proc = opd_run(str(src), "--workdir", str(workdir), "--teacher", "local")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # a config error: retrying would not help
    assert "stage sft failed" in proc.stderr
    assert "missing.jsonl" in proc.stderr  # the stage's own error, from its log tail
    assert f"opd run {src} --workdir {workdir} --resume" in proc.stderr
    assert not (workdir / "metrics" / "distill.jsonl").exists()


BAD = {
    "typo": (lambda s: s["distill"].update(promptsPerStp=8), "spec.distill.promptsPerStp",
             "did you mean `promptsPerStep`?"),
    "negative lr": (lambda s: s["distill"].update(optimizer={"learningRate": -1}),
                    "spec.distill.optimizer.learningRate", "greater than 0"),
    "no teacher": (lambda s: s.pop("teacher"), "spec.teacher", "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_run_file_fails_before_torch_loads(tiny_world, tmp_path, case):
    mutate, field, hint = BAD[case]
    doc = yaml.safe_load(run_file(tmp_path, tiny_world).read_text())
    mutate(doc["spec"])
    src = tmp_path / "bad.yaml"
    src.write_text(yaml.safe_dump(doc))
    code = ("import sys\nfrom opd_runtime.cli import main\n"
            f"rc = main(['run', {str(src)!r}, '--workdir', {str(tmp_path / 'w')!r}])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=opd_env(),
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert field in proc.stderr and hint in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was written


def test_run_serves_the_teacher_with_vllm_and_stops_it_after_opd(tiny_world, tmp_path):
    """`--teacher vllm`: `opd serve-teacher` (real vLLM) runs beside OPD, which scores over HTTP."""
    doc = yaml.safe_load(run_file(tmp_path, tiny_world, distill_steps=2).read_text())
    doc["spec"].pop("sft")
    doc["spec"]["eval"]["targets"] = ["distill"]
    doc["spec"]["teacher"]["serving"] = {"maxModelLen": 256, "gpuMemoryUtilization": 0.1}
    src = tmp_path / "vllm.yaml"
    src.write_text(yaml.safe_dump(doc, sort_keys=False))
    workdir = tmp_path / "work"
    proc = opd_run(str(src), "--workdir", str(workdir), "--teacher", "vllm")
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\n" + (workdir / "logs" / "teacher.log").read_text()[-3000:]
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
