"""`opd run`'s tiny-world step: it says what it prepares and where the cache is, relays the build's
progress, and is skipped when the run has no tiny:// model or the world is already there. The real world is
never rebuilt here: the step copies a planted cache entry, and the build's progress lines are checked on a
miniature WorldConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_runtime import tiny_models
from opd_runtime.spec import parse_run
from opd_runtime.tiny_models import ModelShape, StepReporter, WorldConfig
from opd_runtime.world_step import build_world, tiny_model_names, world_log

from support.runs import run_doc


def test_step_reporter_prints_the_first_step_then_every_interval_and_the_last():
    now = [0.0]
    lines: list[str] = []
    report = StepReporter("teacher", 100, lines.append, every=10.0, clock=lambda: now[0])
    for step in range(100):
        now[0] = step * 1.0 + 1.0  # one second a step
        report(step, 2.0 - step / 100)
    assert lines[0] == "teacher: step 1/100, loss 2.000, 1s, about 99s left"
    assert [ln.split(",")[0] for ln in lines] == [
        f"teacher: step {n}/100" for n in (1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100)
    ]
    assert lines[-1] == "teacher: step 100/100, loss 1.010, 100s"  # no time left to announce


def test_tiny_model_names_lists_every_tiny_reference():
    run = parse_run(run_doc("tiny://student-init", "tiny://teacher", student_tokenizer="tiny://tokenizer"))
    assert sorted(tiny_model_names(run)) == ["tiny://student-init", "tiny://teacher", "tiny://tokenizer"]
    assert tiny_model_names(parse_run(run_doc("/models/s", "/models/t"))) == []


def test_a_stage_builds_the_world_only_for_the_tiny_models_it_uses():
    """An SFT stage of a run whose student is a path and whose teacher is tiny:// must not train the tiny
    teacher first (a multi-node SFT test spent its whole timeout building the world this way)."""
    run = parse_run(run_doc("/models/s", "tiny://teacher"))
    assert tiny_model_names(run, "sft") == []
    assert tiny_model_names(run, "distill") == tiny_model_names(run, "teacher") == ["tiny://teacher"]
    rl = run_doc("/models/s", "tiny://teacher", objective="rl", loss="importance_sampling")
    assert tiny_model_names(parse_run(rl), "distill") == []  # rl grades answers: no teacher to load
    assert tiny_model_names(parse_run(run_doc("tiny://student-init", "/models/t")), "sft") == ["tiny://student-init"]


def plant_cached_world(cache: Path) -> Path:
    """A cache entry for the default WorldConfig, as a finished build leaves it (models stubbed)."""
    entry = cache / "tiny-world" / tiny_models._cache_key(WorldConfig())
    for name in ("tokenizer", "teacher", "student-init", "student"):
        (entry / name).mkdir(parents=True)
        (entry / name / "config.json").write_text("{}")
    (entry / "world.json").write_text(json.dumps({"teacher": {"accuracy": 1.0}}))
    return entry


def test_the_world_step_copies_a_cached_world_saying_where_it_comes_from(tmp_path, monkeypatch):
    entry = plant_cached_world(tmp_path / "cache")
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    run = parse_run(run_doc("tiny://student-init", "tiny://teacher"))
    workdir = tmp_path / "work"
    lines: list[str] = []
    assert build_world(run, workdir, lines.append) == 0
    assert all(ln.startswith("[world] ") for ln in lines), lines
    assert "preparing the tiny world in" in lines[0] and str(tmp_path / "cache" / "tiny-world") in lines[0]
    assert f"[world] tiny world: reusing the build cached in {entry}" in lines
    assert f"[world] tiny world: copied into {workdir / 'models'}" in lines
    assert lines[-1].startswith(f"[world] ready in {workdir / 'models'}")
    assert (workdir / "models" / "world.json").read_text() == (entry / "world.json").read_text()
    assert "reusing the build cached in" in world_log(workdir).read_text()
    again: list[str] = []
    assert build_world(run, workdir, again.append) is None and again == []  # already there: nothing to do


def test_no_world_step_for_a_run_without_tiny_models(tmp_path):
    lines: list[str] = []
    assert build_world(parse_run(run_doc("/m/s", "/m/t")), tmp_path, lines.append) is None
    assert lines == [] and not (tmp_path / "models").exists()


def test_a_failed_world_step_returns_its_exit_code_with_the_error_in_its_log(tmp_path, monkeypatch):
    plant_cached_world(tmp_path / "cache")
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "models").write_text("a file where the models directory should be")
    lines: list[str] = []
    code = build_world(parse_run(run_doc("tiny://student-init", "tiny://teacher")), workdir, lines.append)
    assert code == 2 and not any("ready in" in ln for ln in lines)
    assert f"{workdir / 'models'} is not a directory" in world_log(workdir).read_text()
    assert any("is not a directory" in ln for ln in lines)  # shown as well as logged


@pytest.mark.slow
def test_a_build_reports_each_phase_and_training_progress(tmp_path):
    shape = ModelShape(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, intermediate_size=64
    )
    cfg = WorldConfig(
        teacher_traces=64,
        teacher_steps=3,
        student_traces=16,
        student_steps=2,
        batch_size=8,
        eval_problems=2,
        teacher=shape,
        student=shape,
    )
    lines: list[str] = []
    tiny_models.build_cached(tmp_path / "out", cfg, tmp_path / "cache", log=lines.append)
    entry = tmp_path / "cache" / "tiny-world" / tiny_models._cache_key(cfg)
    assert lines[0].startswith(f"tiny world: no cached build in {entry}: building it")
    assert "tokenizer: training the BPE tokenizer on 4,000 tinymath traces" in lines
    assert any(ln.startswith("teacher: step 1/3, loss") for ln in lines)
    assert any(ln.startswith("teacher: step 3/3, loss") for ln in lines)
    assert any(ln.startswith("student: step 2/2, loss") for ln in lines)
    assert lines[-2] == f"tiny world: copied into {tmp_path / 'out'}"
    # a shortened config has no recorded build to compare with, and says so
    assert lines[-1].startswith(f"tiny world: no recorded build for key {tiny_models._cache_key(cfg)}")
