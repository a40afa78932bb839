"""Dataset fields that word and pick the problems: `instruction` and `systemPrompt` (applied alike to SFT
traces, OPD prompts and eval problems, seen through the real Qwen3 chat template), `filter` and a seeded
`shuffle` before `maxSamples`, errors that name the field, and OPD's sample accuracy graded by the prompts'
`kind`."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from opd_runtime import cli
from opd_runtime.contract import EXIT_BAD_CONFIG
from opd_runtime.data_sources import MATH_INSTRUCTION, buffer_shuffle, iter_records, load_prompts
from opd_runtime.distill.learner import _graded
from opd_runtime.generation import Sample
from opd_runtime.sft.traces import load_traces
from opd_runtime.spec import DatasetSpec, EvalDatasetSpec, ProblemSetSpec, SpecError, parse_run

from support.runs import run_doc

PROBLEM = "What is 2+2?"
SYSTEM = "You are a careful mathematician."


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def qwen3(qwen3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


def rendered(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)


@pytest.fixture
def problems(tmp_path) -> Path:
    return write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "problem": PROBLEM, "answer": "4"}])


def test_prompts_default_to_the_recipes_instruction_and_no_system_prompt(qwen3, problems):
    (prompt,) = load_prompts(ProblemSetSpec(path=str(problems)))
    assert rendered(qwen3, prompt.messages) == (
        f"<|im_start|>user\n{PROBLEM}\n{MATH_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_system_prompt_and_empty_instruction_in_the_chat_template(qwen3, problems):
    spec = ProblemSetSpec(path=str(problems), instruction="", system_prompt=SYSTEM)
    (prompt,) = load_prompts(spec)
    assert rendered(qwen3, prompt.messages) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"
    )
    own = ProblemSetSpec(path=str(problems), instruction="Answer in \\boxed{}.")
    assert load_prompts(own)[0].messages == [{"role": "user", "content": f"{PROBLEM}\nAnswer in \\boxed{{}}."}]


def test_eval_problems_and_opd_prompts_are_worded_alike(problems):
    fields = {"path": str(problems), "instruction": "Think.", "systemPrompt": SYSTEM}
    eval_set = EvalDatasetSpec.model_validate({**fields, "kind": "aime"})
    opd_set = ProblemSetSpec.model_validate(fields)
    assert (
        load_prompts(eval_set)[0].messages
        == load_prompts(opd_set)[0].messages
        == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{PROBLEM}\nThink."},
        ]
    )


def test_tinymath_prompts_stay_bare_unless_an_instruction_is_set():
    bare = load_prompts(ProblemSetSpec(name="tinymath", split="test", max_samples=2))
    assert [m["role"] for m in bare[0].messages] == ["user"] and "\n" not in bare[0].messages[0]["content"]
    told = load_prompts(ProblemSetSpec(name="tinymath", split="test", max_samples=2, instruction="Box it."))
    assert told[0].messages[0]["content"] == bare[0].messages[0]["content"] + "\nBox it."


def test_sft_traces_keep_their_wording_by_default_and_take_the_fields_when_set(qwen3, tmp_path):
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "id": "t",
                "messages": [
                    {"role": "system", "content": "Old system."},
                    {"role": "user", "content": PROBLEM},
                    {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n\n\\boxed{4}"},
                ],
            }
        ],
    )
    (kept,) = load_traces(DatasetSpec(path=str(chat)))
    assert rendered(qwen3, kept.messages[:-1]) == (
        f"<|im_start|>system\nOld system.<|im_end|>\n<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"
    )
    (worded,) = load_traces(DatasetSpec(path=str(chat), instruction="Box it.", system_prompt=""))
    assert rendered(qwen3, worded.messages[:-1]) == (
        f"<|im_start|>user\n{PROBLEM}\nBox it.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert worded.messages[-1] == kept.messages[-1]  # the trace itself, which carries the loss, is untouched


@pytest.mark.parametrize(
    "record",
    [
        {"id": "x", "problem": PROBLEM},  # no conversation at all
        {"id": "x", "conversations": [{"from": "narrator", "value": PROBLEM}]},  # a role no format knows
        {"id": "x", "messages": [{"role": "user"}]},  # a turn without content
    ],
)
def test_a_record_that_is_no_chat_trace_is_a_configuration_error_naming_the_dataset(tmp_path, record):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(SpecError) as err:
        list(load_traces(DatasetSpec(path=str(path))))
    assert str(err.value).startswith("spec.sft.dataset: record 0 (x)") and "set `format`" in str(err.value)


# ---- filter and shuffle --------------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path) -> Path:
    rows = [
        {"id": i, "problem": f"p{i}", "answer": str(i), "domain": "math" if i % 3 else "code", "level": i % 2}
        for i in range(60)
    ]
    rows.append({"id": 60, "problem": "p60", "answer": "60"})  # no domain: a filter on it drops the row
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def test_filter_keeps_only_records_with_equal_fields(mixed):
    kept = list(iter_records(DatasetSpec(path=str(mixed), filter={"domain": "math"})))
    assert len(kept) == 40 and all(r["domain"] == "math" for r in kept)
    both = list(iter_records(DatasetSpec(path=str(mixed), filter={"domain": "math", "level": 1})))
    assert [r["id"] for r in both] == [i for i in range(60) if i % 3 and i % 2 == 1]
    # a value typed differently in the manifest and the file still matches: "1" (string) equals 1
    assert list(iter_records(DatasetSpec(path=str(mixed), filter={"level": "1"}))) == list(
        iter_records(DatasetSpec(path=str(mixed), filter={"level": 1}))
    )


def test_a_filter_that_keeps_nothing_names_the_field_and_the_filter(mixed):
    with pytest.raises(SpecError) as err:
        load_prompts(ProblemSetSpec(path=str(mixed), filter={"domain": "physics"}), field="spec.distill.prompts")
    assert "spec.distill.prompts" in str(err.value) and "physics" in str(err.value) and "`filter`" in str(err.value)


def test_seeded_shuffle_comes_before_max_samples(mixed):
    def ids(**kw) -> list:
        return [p.id for p in load_prompts(ProblemSetSpec(path=str(mixed), **kw))]

    head = ids(max_samples=10)
    assert head == [str(i) for i in range(10)]
    drawn = ids(max_samples=10, shuffle=True, seed=1)
    assert drawn == ids(max_samples=10, shuffle=True, seed=1)  # the same seed, the same sample
    assert drawn != head and max(int(i) for i in drawn) >= 10  # drawn from the whole set, not its head
    assert drawn != ids(max_samples=10, shuffle=True, seed=2)
    everything = ids(shuffle=True, seed=1)
    assert sorted(everything, key=int) == [str(i) for i in range(61)]  # a permutation: nothing lost or doubled
    code = ids(shuffle=True, seed=1, filter={"domain": "code"})  # filtered first, then shuffled
    assert sorted(code, key=int) == [str(i) for i in range(0, 60, 3)] and code != sorted(code, key=int)


def test_buffer_shuffle_is_a_seeded_permutation_whatever_the_buffer_size():
    out = list(buffer_shuffle(range(1000), buffer=50, seed=0))
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert list(buffer_shuffle(range(1000), buffer=50, seed=0)) == out
    full = list(buffer_shuffle(range(100), buffer=1000, seed=0))
    assert sorted(full) == list(range(100)) and full != list(range(100))


def test_filter_and_shuffle_are_validated():
    def error_of(prompts: dict) -> str:
        doc = run_doc("s", "t")
        doc["spec"]["distill"]["prompts"] = prompts
        with pytest.raises(SpecError) as err:
            parse_run(doc)
        return str(err.value)

    assert "spec.distill.prompts" in error_of({"name": "tinymath", "filter": {"difficulty": 2}})
    assert "spec.distill.prompts" in error_of({"name": "tinymath", "shuffle": True})
    msg = error_of({"path": "x.jsonl", "filter": {"domain": ["math", "code"]}})
    assert "filter.domain" in msg and "one value per field" in msg
    assert "spec.distill.prompts.shuffleBuffer" in error_of({"path": "x.jsonl", "shuffle": True, "shuffleBuffer": 0})


# ---- a wrong prompts path is a configuration error (exit 2) that names the field ----------------------------


@pytest.mark.parametrize("kind", ["missing", "directory", "not-json"])
def test_a_bad_prompts_path_exits_2_naming_spec_distill_prompts_path(random_models, tmp_path, kind):
    target = tmp_path / "prompts.jsonl"
    if kind == "directory":
        target.mkdir()
    elif kind == "not-json":
        target.write_text("[1, 2]\n")
    doc = run_doc(random_models.student, random_models.teacher, prompts={"path": str(target)})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["distill", "--config", str(config), "--workspace", str(tmp_path / "ws")])
    assert code == EXIT_BAD_CONFIG, out.getvalue() + err.getvalue()
    assert "spec.distill.prompts.path" in err.getvalue() and str(target) in err.getvalue()


# ---- sample_accuracy grades as eval does: by the prompts' kind ----------------------------------------------


def test_opd_sample_accuracy_grades_by_the_datasets_kind(random_models):
    tokenizer = AutoTokenizer.from_pretrained(random_models.tokenizer)

    def graded(completions: list[str], answers: list[str], kind: str) -> tuple[int, int]:
        samples = [Sample([], tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
        return _graded(tokenizer, samples, answers, kind)

    # AIME-style: integers compared as integers, and nothing else counts
    assert graded(["so \\boxed{025}", "\\boxed{\\frac{50}{2}}"], ["25", "25"], "aime") == (1, 2)
    # math: math-verify decides, so 50/2 is 25 and 0.5 is 1/2 (integer grading got both wrong)
    assert graded(["\\boxed{\\frac{50}{2}}", "\\boxed{0.5}", "\\boxed{3}"], ["25", "\\frac{1}{2}", "4"], "math") == (
        2,
        3,
    )
    assert graded(["\\boxed{4}"], [None], "math") == (0, 0)  # prompts without an answer are not graded
