"""The DistillationRun spec: defaults, validation messages, and no torch on the import path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd_runtime.spec import SpecError, load_run, parse_run

ROOT = Path(__file__).resolve().parents[2]


def minimal(**spec):
    base = {"student": {"model": "s"}, "teacher": {"model": "t"}, "distill": {"prompts": {"name": "tinymath"}}}
    base.update(spec)
    return {"apiVersion": "opd.dev/v1alpha1", "kind": "DistillationRun", "metadata": {"name": "r"}, "spec": base}


def error_of(doc) -> str:
    with pytest.raises(SpecError) as exc:
        parse_run(doc)
    return str(exc.value)


def test_defaults_fill_a_minimal_run():
    run = parse_run(minimal())
    d = run.spec.distill
    assert (d.steps, d.samples_per_prompt, d.kl_coef, d.discount, d.loss) == (150, 4, 1.0, 0.0, "importance_sampling")
    assert run.spec.teacher.backend == "vllm-server"
    assert run.spec.enabled_stages() == ["distill"]
    assert run.spec.workspace.retention_policy == "Retain"


def test_wire_format_is_camel_case_and_round_trips():
    run = parse_run(minimal())
    wire = run.to_wire()
    assert "promptsPerStep" in wire["spec"]["distill"]
    assert parse_run(wire) == run


def test_typo_names_the_field_and_suggests_the_fix():
    doc = minimal()
    doc["spec"]["distill"]["learningRat"] = 1e-4
    msg = error_of(doc)
    assert "spec.distill.learningRat" in msg and "unknown field" in msg


def test_typo_in_nested_model_suggests_close_name():
    doc = minimal()
    doc["spec"]["distill"]["optimizer"] = {"learningrate": 1e-4}
    msg = error_of(doc)
    assert "spec.distill.optimizer.learningrate" in msg and "did you mean `learningRate`" in msg


def test_negative_learning_rate_is_rejected():
    doc = minimal()
    doc["spec"]["distill"]["optimizer"] = {"learningRate": -1e-4}
    msg = error_of(doc)
    assert "spec.distill.optimizer.learningRate" in msg and "greater than 0" in msg and "-0.0001" in msg


def test_missing_teacher_is_rejected():
    doc = minimal()
    del doc["spec"]["teacher"]
    assert "spec.teacher: required field is missing" in error_of(doc)


def test_unknown_stage_is_rejected():
    doc = minimal(rl={"enabled": True})
    assert "spec.rl: unknown field" in error_of(doc)


def test_dataset_needs_exactly_one_source():
    doc = minimal()
    doc["spec"]["distill"]["prompts"] = {"name": "tinymath", "path": "x.jsonl"}
    assert "exactly one of `name`" in error_of(doc)


def test_wrong_type_names_field():
    doc = minimal()
    doc["spec"]["distill"]["steps"] = "many"
    assert "spec.distill.steps" in error_of(doc)


def test_no_enabled_stage_is_rejected():
    doc = minimal()
    doc["spec"]["distill"]["enabled"] = False
    assert "enable at least one" in error_of(doc)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    run = load_run(path)
    assert run.spec.enabled_stages()


def test_production_example_states_the_published_recipe():
    run = load_run(ROOT / "examples" / "qwen3-1.7b-aime.yaml")
    s = run.spec
    assert s.student.model == "Qwen/Qwen3-1.7B-Base" and s.teacher.model == "Qwen/Qwen3-8B"
    assert s.enabled_stages() == ["sft", "distill", "eval"]
    assert "OpenThoughts3" in s.sft.dataset.name and "DeepMath" in s.distill.prompts.name
    assert s.distill.kl_coef == 1.0 and s.distill.discount == 0.0 and s.distill.loss == "importance_sampling"
    assert s.eval.datasets[0].name == "aime24"


def test_file_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_run(bad)
    with pytest.raises(SpecError, match="no such file"):
        load_run(tmp_path / "missing.yaml")
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(minimal()) + "---\n" + yaml.safe_dump(minimal()))
    with pytest.raises(SpecError, match="exactly one DistillationRun"):
        load_run(two)


def test_bad_spec_fails_before_anything_heavy_loads(tmp_path):
    """Validation runs before torch/transformers import, which is what keeps it fast (timed in bench/)."""
    bad = tmp_path / "run.yaml"
    doc = minimal()
    doc["spec"]["distill"]["optimizer"] = {"learningRate": -1}
    bad.write_text(yaml.safe_dump(doc))
    code = (
        "import sys; import opd_runtime.spec, opd_runtime.workspace; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "from opd_runtime.cli import main; "
        "rc = main(['distill', '--config', sys.argv[1], '--workspace', sys.argv[2]]); "
        "assert 'torch' not in sys.modules, 'torch was imported before validation failed'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(bad), str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "spec.distill.optimizer.learningRate" in proc.stderr
    assert not (tmp_path / "ws").exists()


def test_every_field_is_documented():
    from opd_runtime.spec.reference import rows
    from opd_runtime.spec.run import DistillationRunSpec

    undocumented = [path for path, _, _, desc in rows(DistillationRunSpec) if len(desc) < 10]
    assert undocumented == []


def test_docs_reference_is_current():
    from opd_runtime.spec.reference import BEGIN, embed

    page = (ROOT / "docs" / "reference" / "distillationrun.md").read_text()
    assert BEGIN in page
    assert embed(page) == page, "run `make docs` (or `opd spec-reference --readme docs/reference/distillationrun.md`)"


def test_reference_lists_a_shared_model_once_and_points_to_it():
    """The pod inputs are one model at five places (spec.pod, each stage's pod, the teacher's serving.pod):
    the reference lists its fields under spec.pod only and the other four point there; every pointer of
    the table leads to rows that are listed."""
    import re

    from opd_runtime.spec.reference import markdown

    table = markdown()
    paths = re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE)
    assert len(paths) == len(set(paths)) and "spec.pod.env[].valueFrom.secretKeyRef.key" in paths
    for stage_pod in ("spec.teacher.serving.pod", "spec.sft.pod", "spec.distill.pod", "spec.eval.pod"):
        assert stage_pod in paths and not [p for p in paths if p.startswith(stage_pod + ".")], stage_pod
    pointers = re.findall(r"^\| `([^`]+)` \|.*Same fields as `([^`]+)`\. \|$", table, flags=re.MULTILINE)
    assert ("spec.sft.pod", "spec.pod") in pointers and ("spec.distill.lora", "spec.sft.lora") in pointers
    for _, home in pointers:
        assert any(p.startswith((home + ".", home + "[].")) for p in paths), home


def test_reference_table_rows_have_four_cells():
    """A `|` left unescaped in a type (`str | None`) or a description splits a row into extra columns."""
    import re

    from opd_runtime.spec.reference import markdown

    for line in markdown().splitlines():
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        assert len(cells) == 4, line
    assert "| `spec.student.revision` | str |" in markdown()


def test_rl_example_is_the_demo_with_objective_rl():
    """examples/tiny-math-rl.yaml is the demo's RL baseline: the same world, stages, sampler, loss, optimizer
    and budget; only the objective differs (and the teacher's serving settings, which rl ignores)."""
    from opd_runtime.plan import planned_stages

    demo, rl = (load_run(ROOT / "examples" / name) for name in ("tiny-math.yaml", "tiny-math-rl.yaml"))
    assert (demo.spec.distill.objective, rl.spec.distill.objective) == ("distill", "rl")
    ours, theirs = demo.spec.model_dump(), rl.spec.model_dump()
    for spec in (ours, theirs):
        del spec["distill"]["objective"], spec["teacher"]["serving"]
    assert ours == theirs
    assert planned_stages(demo) == ["sft", "teacher", "distill", "eval"]
    assert planned_stages(rl) == ["sft", "distill", "eval"]  # no teacher server for rl
