"""Grading: the last boxed answer, integer and math-verify comparisons, garbage and hangs, `opd grade`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_runtime import cli
from opd_runtime.grading import grade, grade_many
from opd_runtime.grading.answers import last_boxed
from opd_runtime.grading.files import GradeInputError, read_grade_file

from support.processes import opd_env


def test_boxed_integer_with_leading_zeros_equals_the_integer():
    assert grade("so the answer is \\boxed{025}", "25", kind="aime").correct
    assert grade("\\boxed{025}", 25, kind="math").correct
    assert grade("\\boxed{ 1,000 }", "1000", kind="aime").correct
    assert not grade("\\boxed{026}", "25", kind="aime").correct


def test_integral_decimals_count_for_aime_but_nothing_else_does():
    assert grade("\\boxed{25.0}", "25", kind="aime").correct
    assert not grade("\\boxed{25.5}", "25", kind="aime").correct
    assert not grade("\\boxed{\\frac{50}{2}}", "25", kind="aime").correct  # aime wants the integer itself
    assert grade("\\boxed{\\frac{50}{2}}", "25", kind="math").correct  # math-verify: the same number


def test_nested_braces_and_fractions():
    assert last_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert grade("The answer is $\\boxed{\\frac{1}{2}}$.", "1/2", kind="math").correct
    assert grade("\\boxed{\\frac12}", "\\frac{1}{2}", kind="math").correct
    assert grade("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", kind="math").correct
    assert grade("\\fbox{0.5}", "\\frac{1}{2}", kind="math").correct
    assert not grade("\\boxed{\\frac{1}{3}}", "1/2", kind="math").correct


def test_the_last_boxed_answer_wins():
    text = "first \\boxed{7}, then on reflection \\boxed{12}"
    assert last_boxed(text) == "12"
    assert grade(text, "12", kind="aime").correct
    assert not grade(text, "7", kind="aime").correct
    # an unfinished box at the end does not replace the last complete one
    assert last_boxed("\\boxed{3} and \\boxed{4") == "3"
    # a box inside a box: the inner one starts last
    assert last_boxed("\\boxed{\\boxed{5}}") == "5"


def test_no_boxed_answer_is_wrong_not_an_error():
    g = grade("The answer is 25.", "25", kind="aime")
    assert (g.correct, g.extracted, g.key) == (False, None, None)
    assert not grade("", "1/2", kind="math").correct
    assert not grade("\\boxed", "1/2", kind="math").correct


def test_garbage_returns_wrong():
    megabyte = 1 << 20
    unbalanced = "\\boxed{" * (megabyte // 7)
    assert grade(unbalanced, "1", kind="math").correct is False
    assert grade("}" * megabyte + "{" * megabyte + "\\boxed{{{", "1", kind="aime").correct is False
    huge_box = "\\boxed{" + "x+(" * (megabyte // 3) + "}"
    assert grade(huge_box, "1", kind="math").correct is False
    noise = "".join(chr(33 + (i * 7919) % 90) for i in range(megabyte))
    assert grade(noise, "1/2", kind="math").correct is False
    assert grade("\\boxed{\\frac{\\frac{}{}}{\\sqrt[}}", "1/2", kind="math").correct is False


def test_a_comparison_that_hangs_is_cut_off_and_wrong():
    # sympy does not finish evaluating this: the worker is killed at the time limit
    g = grade("\\boxed{10!!!!!}", "5", kind="math", timeout_s=1.0)
    assert (g.correct, g.method) == (False, "timeout")
    # and the pool goes on grading with a fresh worker
    assert grade("\\boxed{\\frac{2}{4}}", "1/2", kind="math").correct


def test_without_math_verify_normalised_strings_decide(tmp_path):
    # an environment where `import math_verify` fails: the workers report it and grading falls back
    (tmp_path / "math_verify.py").write_text("raise ImportError('math-verify is not installed here')\n")
    env = opd_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    code = (
        "import json; from opd_runtime.grading import grade; print(json.dumps(["
        "grade('\\\\boxed{\\\\dfrac{1}{2}}', '\\\\frac{1}{2}').correct, "
        "grade('\\\\boxed{0.5}', '1/2').method, grade('\\\\boxed{0.5}', '1/2').correct, "
        "grade('\\\\boxed{025}', '25', 'aime').correct]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [True, "unavailable", False, True]


def test_grade_many_mixes_kinds_and_keeps_order():
    items = [
        ("\\boxed{025}", "25"),
        ("\\boxed{\\frac{50}{2}}", "25"),
        ("no answer", "3"),
        ("\\boxed{x=2}", "2", "math"),
        ("\\boxed{2.5}", "2.5", "aime"),
    ]
    assert [g.correct for g in grade_many(items, kind="aime", timeout_s=10, workers=2)] == [
        True,
        False,
        False,
        True,
        True,
    ]
    assert [g.correct for g in grade_many(items, kind="math", timeout_s=10, workers=2)] == [
        True,
        True,
        False,
        True,
        True,
    ]


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_opd_grade_prints_accuracy_and_writes_results(tmp_path, capsys):
    src = write_lines(
        tmp_path / "in.jsonl",
        [
            {"completion": "... \\boxed{025}", "answer": "25"},
            {"completion": "\\boxed{\\frac{1}{2}}", "answer": "1/2", "kind": "math"},
            {"completion": "I give up", "answer": 3},
            "",
            {"completion": "\\boxed{7} no, \\boxed{8}", "answer": 8},
        ],
    )
    out = tmp_path / "out.jsonl"
    code = cli.main(["grade", "--input", str(src), "--kind", "aime", "--output", str(out)])
    assert code == 0
    assert capsys.readouterr().out.strip() == "accuracy 0.750 (3/4)"
    results = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["line"] for r in results] == [1, 2, 3, 5]
    assert [r["correct"] for r in results] == [True, True, False, True]
    assert [r["extracted"] for r in results] == ["025", "\\frac{1}{2}", None, "8"]
    assert results[1]["kind"] == "math" and results[0]["kind"] == "aime"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"completion": "\\\\boxed{1}"}', "missing field `answer`"),
        ('{"answer": "1"}', "missing field `completion`"),
        ('["a list"]', "expected a JSON object"),
        ('{"completion": "x", "answer": null}', "`answer` must be a string or a number"),
        ('{"completion": "x", "answer": "1", "kind": "gsm8k"}', "`kind` must be one of aime, math"),
    ],
)
def test_opd_grade_names_the_bad_line(tmp_path, capsys, bad, message):
    src = write_lines(tmp_path / "in.jsonl", [{"completion": "\\boxed{1}", "answer": "1"}, "", bad])
    with pytest.raises(GradeInputError, match=message):
        read_grade_file(src)
    assert cli.main(["grade", "--input", str(src)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3:" in err and message in err


def test_opd_grade_missing_or_empty_file(tmp_path, capsys):
    assert cli.main(["grade", "--input", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["grade", "--input", str(write_lines(tmp_path / "empty.jsonl", ["", ""]))]) == 2
    assert "no lines to grade" in capsys.readouterr().err
