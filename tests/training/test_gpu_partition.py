"""``opd run`` on a machine with GPUs: which GPUs each stage gets (gpu_plan.partition, a pure function of
the visible devices and the spec), tested with faked device lists; and one ``opd run`` that consults it
(its device count faked, its stage real: 2 gloo processes on the CPU under the launcher)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from opd_runtime import runner
from opd_runtime.gpu_plan import partition
from opd_runtime.plan import launcher_argv, planned_stages, stage_command
from opd_runtime.spec import DistillationRun, SpecError, parse_run

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "examples" / "tiny-math.yaml").read_text())
QWEN = yaml.safe_load((ROOT / "examples" / "qwen3-1.7b-aime.yaml").read_text())
ALL = ("sft", "teacher", "distill", "eval")


def devices(n: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n))


def spec(
    base: dict = TINY, *, sft: int = 0, distill: int = 0, eval: int = 0, tp: int = 1, **serving
) -> DistillationRun:
    doc = copy.deepcopy(base)
    for stage, gpus in (("sft", sft), ("distill", distill), ("eval", eval)):
        doc["spec"][stage]["resources"] = {"gpus": gpus}
    # the teacher as on GPUs: its default resources, tensorParallelSize GPUs (the CPU example asks for none)
    doc["spec"]["teacher"]["serving"].pop("resources", None)
    doc["spec"]["teacher"]["serving"].update(tensorParallelSize=tp, **serving)
    return parse_run(doc)


def cmd(run: DistillationRun, stage: str):
    return stage_command(run, stage, config="/w/run.yaml", workspace="/w")


def test_without_gpus_nothing_changes():
    run = spec(sft=8, distill=8, eval=8, tp=4)  # what the spec asks for matters only where GPUs exist
    plan = partition(run, devices(0), ALL)
    assert plan.lines() == [] and plan.stages == {}
    for stage in ALL:
        assert plan.command(cmd(run, stage)) == cmd(run, stage)


def test_one_gpu_runs_each_stage_alone_and_refuses_teacher_beside_learner():
    run = spec(sft=1, distill=1, eval=1)
    with pytest.raises(SpecError) as err:
        partition(run, devices(1), ALL)
    text = str(err.value)
    assert "1 GPU(s)" in text
    assert "spec.teacher.serving.tensorParallelSize 1 + spec.distill.resources.gpus 1 = 2" in text
    assert "lower spec.distill.resources.gpus to 0 or fewer" in text
    plan = partition(run, devices(1), ("sft", "distill", "eval"))  # teacher scored in-process (--teacher local)
    for stage in ("sft", "distill", "eval"):
        placed = plan.command(cmd(run, stage))
        assert placed.argv == cmd(run, stage).argv  # one process: no launcher
        assert placed.env["CUDA_VISIBLE_DEVICES"] == "0"


def test_two_gpus_split_between_teacher_and_learner_and_a_training_stage_uses_both():
    run = spec(sft=2, distill=1, eval=2)
    plan = partition(run, devices(2), ALL, python="/venv/bin/python")
    env = {s: plan.command(cmd(run, s)).env["CUDA_VISIBLE_DEVICES"] for s in ALL}
    assert env == {"sft": "0,1", "teacher": "0", "distill": "1", "eval": "0,1"}  # teacher and learner: disjoint
    assert plan.command(cmd(run, "sft")).argv == launcher_argv(2, python="/venv/bin/python") + cmd(run, "sft").argv
    assert plan.command(cmd(run, "sft")).argv[:3] == ("/venv/bin/python", "-m", "opd_runtime.launch")
    for stage in ("teacher", "distill", "eval"):  # one server, one learner process, eval tensor parallel
        assert plan.command(cmd(run, stage)).argv == cmd(run, stage).argv
    assert plan.lines() == [
        "GPUs: 2 visible (0,1)",
        "  sft: GPUs 0,1, 2 processes (torchrun, one per GPU)",
        "  teacher: GPU 0 (vLLM server, tensor parallel over them)",
        "  distill: GPU 1, 1 process",
        "  eval: GPUs 0,1 (tensor parallel over them)",
    ]


def test_eight_gpus_the_published_example_needs_nine_at_once_and_is_refused_naming_both_fields():
    run = parse_run(QWEN)  # distill 8 GPUs + a teacher of tensorParallelSize 1
    with pytest.raises(SpecError) as err:
        partition(run, devices(8), planned_stages(run))
    text = str(err.value)
    assert "spec.teacher.serving.tensorParallelSize 1 + spec.distill.resources.gpus 8 = 9" in text
    assert "lower spec.distill.resources.gpus to 7 or fewer" in text
    doc = copy.deepcopy(QWEN)
    doc["spec"]["distill"]["resources"]["gpus"] = 7
    run = parse_run(doc)
    plan = partition(run, devices(8), planned_stages(run))
    teacher, learner = plan.command(cmd(run, "teacher")), plan.command(cmd(run, "distill"))
    assert teacher.env["CUDA_VISIBLE_DEVICES"] == "0" and learner.env["CUDA_VISIBLE_DEVICES"] == "1,2,3,4,5,6,7"
    assert (
        "--nproc-per-node=7" in learner.argv
        and learner.argv[-len(cmd(run, "distill").argv) :] == cmd(run, "distill").argv
    )
    assert plan.command(cmd(run, "sft")).env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert "--nproc-per-node=8" in plan.command(cmd(run, "sft")).argv


def test_idle_gpus_are_reported_and_a_stage_asking_for_none_sees_none():
    run = spec(sft=0, distill=2, eval=1, tp=2)
    plan = partition(run, devices(8), ALL)
    assert plan.command(cmd(run, "sft")).env["CUDA_VISIBLE_DEVICES"] == ""  # the spec asks for the CPU
    assert plan.command(cmd(run, "teacher")).env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert plan.command(cmd(run, "distill")).env["CUDA_VISIBLE_DEVICES"] == "2,3"
    lines = plan.lines()
    assert "  sft: no GPU (CPU)" in lines
    assert lines[-1] == "  4 GPU(s) idle during distill: raise spec.distill.resources.gpus to use them"


def test_the_visible_ids_are_used_as_given_and_serving_resources_are_named_when_set():
    run = spec(sft=3, distill=1, eval=1, tp=1, resources={"gpus": 2})
    plan = partition(run, ("3", "5", "6"), ALL)
    assert plan.command(cmd(run, "sft")).env["CUDA_VISIBLE_DEVICES"] == "3,5,6"
    assert plan.command(cmd(run, "teacher")).env["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert plan.command(cmd(run, "distill")).env["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(SpecError, match=r"spec.teacher.serving.resources.gpus 2 \+ spec.distill.resources.gpus 1"):
        partition(run, ("3", "5"), ("teacher", "distill"))
    with pytest.raises(SpecError, match=r"^spec.sft.resources.gpus 3: this machine has 2 GPU\(s\)"):
        partition(run, ("3", "5"), ("sft",))


# ---- `opd run` consults it -------------------------------------------------------------------------------


def sft_only(tmp_path: Path, world, gpus: int) -> Path:
    """A 2-step SFT run on the tiny world's models (``world`` None: tiny:// names, never loaded)."""
    student, teacher = (world.student, world.teacher) if world else ("tiny://student-init", "tiny://teacher")
    doc = {
        "apiVersion": "opd.dev/v1alpha1",
        "kind": "DistillationRun",
        "metadata": {"name": "gpus"},
        "spec": {
            "student": {"model": str(student), "dtype": "float32"},
            "teacher": {"model": str(teacher), "dtype": "float32", "backend": "local"},
            "sft": {
                "dataset": {"name": "tinymath", "maxSamples": 16},
                "steps": 2,
                "batchSize": 4,
                "microBatchSize": 2,
                "maxSeqLength": 64,
                "gradientCheckpointing": False,
                "checkpointing": {"every": 1, "keep": 1},
                "resources": {"gpus": gpus},
            },
        },
    }
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_opd_run_refuses_a_spec_larger_than_the_machine_before_touching_the_workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "visible_gpus", lambda: devices(2))
    opts = runner.RunOptions(sft_only(tmp_path, None, gpus=4), tmp_path / "work", progress=False)
    with pytest.raises(SpecError, match=r"spec.sft.resources.gpus 4: this machine has 2 GPU\(s\)"):
        runner.run_all(opts, log=lambda _line: None)
    assert not (tmp_path / "work").exists()


@pytest.mark.slow  # two processes start torch, transformers and gloo: ~70 s on the shared 2-core machine
def test_opd_run_starts_a_two_gpu_stage_as_two_processes_under_the_launcher(tmp_path, random_models, monkeypatch):
    # No GPU here: the two processes see CUDA_VISIBLE_DEVICES=0,1 and no device, so they train on the CPU
    # over gloo; what is checked is the command line and the environment `opd run` gave the stage.
    monkeypatch.setattr(runner, "visible_gpus", lambda: devices(2))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lines: list[str] = []
    opts = runner.RunOptions(sft_only(tmp_path, random_models, gpus=2), tmp_path / "work", progress=False)
    runner.run_all(opts, log=lines.append)
    assert "GPUs: 2 visible (0,1)" in lines and "  sft: GPUs 0,1, 2 processes (torchrun, one per GPU)" in lines
    first = (tmp_path / "work" / "logs" / "sft.log").read_text().splitlines()[0]
    launcher = " ".join(launcher_argv(2, python=sys.executable))
    assert first.startswith(f"$ {launcher} {runner.opd_program()} sft --config "), first
    assert (tmp_path / "work" / "results" / "sft.json").is_file()
    assert (tmp_path / "work" / "checkpoints" / "sft" / "final").is_dir()
