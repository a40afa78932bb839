"""Settings whose tokens cannot fit their model's positions are refused before the first step
(``preflight.check_context``, run by ``opd validate``), from a local config where there is one and from
the known-model table for hub models this machine has not downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from opd_runtime import cli, preflight
from opd_runtime.contract import EXIT_BAD_CONFIG
from opd_runtime.spec import SpecError, load_run, parse_run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qwen3-1.7b-aime.yaml"


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """No model is downloaded: hub ids are known only from the table."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_with(student: str, *, eval_tokens: int | None = None, distill_tokens: int | None = None, backend="vllm"):
    spec: dict = {"student": {"model": student}, "teacher": {"model": student, "backend": "local"}}
    if distill_tokens is not None:
        spec["distill"] = {
            "prompts": {"name": "tinymath"},
            "maxNewTokens": distill_tokens,
            "sampler": {"backend": backend},
        }
    if eval_tokens is not None:
        spec["eval"] = {
            "datasets": [{"name": "aime24", "kind": "aime"}],
            "targets": ["student"],
            "maxNewTokens": eval_tokens,
            "backend": backend,
        }
    return parse_run(
        {"apiVersion": "opd.dev/v1alpha1", "kind": "DistillationRun", "metadata": {"name": "t"}, "spec": spec}
    )


def tiny_model_dir(root: Path, positions: int) -> Path:
    model = root / "student"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3", "max_position_embeddings": positions}))
    return model


def test_a_local_config_bounds_eval_and_sampling_lengths(tmp_path):
    model = str(tiny_model_dir(tmp_path, 1024))
    assert preflight.model_positions(model)[0] == 1024
    preflight.check_context(run_with(model, eval_tokens=1023, distill_tokens=1023))  # one prompt token fits
    with pytest.raises(SpecError) as err:
        preflight.check_context(run_with(model, eval_tokens=1024, distill_tokens=4000))
    message = str(err.value)
    assert "spec.eval.maxNewTokens: 1024 new tokens" in message and "1024 positions" in message
    assert "spec.distill.maxNewTokens: 4000 new tokens" in message and "its config" in message
    # relative to the workspace, as stages resolve ./paths
    assert preflight.model_positions("./student", root=tmp_path)[0] == 1024
    # Hugging Face generate can run past the positions: not refused
    preflight.check_context(run_with(model, eval_tokens=4000, distill_tokens=4000, backend="hf"))


def test_hub_models_not_on_this_machine_are_checked_from_the_known_table():
    assert preflight.model_positions("Qwen/Qwen3-1.7B-Base") == (
        32768,
        preflight.model_positions("Qwen/Qwen3-8B-Base")[1],
    )
    assert preflight.model_positions("Qwen/Qwen3-8B")[0] == 40960
    assert preflight.model_positions("someone/unknown-model")[0] is None
    with pytest.raises(
        SpecError, match=r"spec.eval.maxNewTokens: 32768 new tokens .* 32768 positions .*known-model table"
    ):
        preflight.check_context(run_with("Qwen/Qwen3-1.7B-Base", eval_tokens=32768))
    preflight.check_context(run_with("Qwen/Qwen3-8B", eval_tokens=32768))  # 40,960 positions
    preflight.check_context(run_with("someone/unknown-model", eval_tokens=10**6))  # nothing known: eval checks


def test_the_published_example_fits_its_models_positions(tmp_path):
    preflight.check_context(load_run(str(EXAMPLE)))
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["spec"]["student"]["model"] == "Qwen/Qwen3-1.7B-Base"  # the table row this relies on


def test_opd_validate_refuses_with_exit_2_naming_the_field(tmp_path, capsys):
    model = tiny_model_dir(tmp_path, 1024)
    doc = run_with(str(model), eval_tokens=2000).model_dump(by_alias=True, exclude_none=True, mode="json")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(doc))
    assert cli.main(["validate", "--config", str(config)]) == EXIT_BAD_CONFIG
    assert "spec.eval.maxNewTokens: 2000 new tokens" in capsys.readouterr().err


def test_the_operator_refuses_what_the_table_knows_and_leaves_the_rest_to_the_stages():
    """The operator reads no model files: its validation (``children.cluster_problems``, which fails the run
    as InvalidSpec before any Job exists) checks hub models from the table, and the published example
    passes it."""
    from opd_operator import children

    (problem,) = children.cluster_problems(run_with("Qwen/Qwen3-1.7B-Base", eval_tokens=32768))
    assert problem.startswith("spec.eval.maxNewTokens: 32768 new tokens") and "known-model table" in problem
    assert children.cluster_problems(run_with("someone/unknown-model", eval_tokens=10**6)) == []
    assert children.cluster_problems(load_run(str(EXAMPLE))) == []
