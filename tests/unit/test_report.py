"""``opd run``'s report: noisy step metrics are compared as window means with standard errors, and the
share of the SFT -> teacher gap that OPD closed is stated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_runtime.report import Side, comparison, curve_rows, gap_closed, mean_se, window, write_report
from opd_runtime.spec import load_run, parse_run
from opd_runtime.workspace import Workspace


def test_window_is_ten_steps_or_a_fifth_of_a_short_run():
    assert [window(n) for n in (1, 4, 5, 24, 50, 200)] == [1, 1, 1, 4, 10, 10]


def test_mean_se_is_the_standard_error_of_the_mean():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx((5 / 3 / 4) ** 0.5)
    assert mean_se([7.0]) == (7.0, 0.0)


def write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curves_average_the_first_and_last_steps_and_the_report_states_the_gap_closed(tmp_path: Path):
    ws = Workspace(tmp_path)
    # 50 steps: reverse KL 1.0 for the first 10 and 0.5 for the last 10; sample_accuracy missing on one step
    write_lines(
        ws.metrics("distill"),
        [
            {"step": s, "reverse_kl": 1.0 if s <= 10 else 0.5, "loss": 0.1, "sample_accuracy": None if s == 1 else 0.2}
            for s in range(1, 51)
        ],
    )
    write_lines(ws.metrics("sft"), [{"step": s, "loss": 5.0 - 0.1 * s, "tokens": 10} for s in range(1, 6)])
    rows = {(st, f): (k, n, a, b) for st, f, k, n, a, b in curve_rows(ws)}
    assert rows["distill", "reverse_kl"] == (10, 50, (1.0, 0.0), (0.5, 0.0))
    assert rows["distill", "sample_accuracy"][1] == 49  # a step without the value is skipped, not zero
    k, n, first, last = rows["sft", "loss"]
    assert (k, n) == (1, 5) and first[0] == pytest.approx(4.9) and last[0] == pytest.approx(4.5)
    assert ("distill", "entropy") not in rows  # not recorded: no row

    ws.result("eval").parent.mkdir(parents=True, exist_ok=True)
    ws.result("eval").write_text(
        json.dumps(
            {
                "targets": {
                    t: {"tinymath": {"pass_at_1": p, "majority_vote": p}}
                    for t, p in (("sft", 0.2), ("distill", 0.6), ("teacher", 1.0))
                }
            }
        )
    )
    run = parse_run(
        {
            "apiVersion": "opd.dev/v1alpha1",
            "kind": "DistillationRun",
            "metadata": {"name": "r"},
            "spec": {
                "student": {"model": "s"},
                "teacher": {"model": "t", "backend": "local"},
                "eval": {"datasets": [{"name": "tinymath", "split": "test"}], "targets": ["teacher"]},
            },
        }
    )
    echoed: list[str] = []
    out = write_report(run, ws, {}, [], echo=echoed.append)
    assert out["gap_closed"] == {"tinymath": pytest.approx(0.5)}
    report = (tmp_path / "report.md").read_text()
    assert "OPD closed 50% of the gap between the SFT student and the teacher on tinymath" in report
    assert "| distill | reverse_kl | 10 of 50 | 1 ± 0 | 0.5 ± 0 |" in report
    assert "OPD closed 50% of the SFT -> teacher gap on tinymath" in echoed


def test_no_gap_is_claimed_without_the_sft_row():
    assert gap_closed([("after OPD", "d", 0.6, 0.6), ("teacher", "d", 1.0, 1.0)]) is None


def test_an_rl_run_reports_rl_not_opd(tmp_path: Path):
    """examples/tiny-math-rl.yaml's report: its distill stage is RL, so the row and the gap say RL."""
    ws = Workspace(tmp_path)
    ws.result("eval").parent.mkdir(parents=True, exist_ok=True)
    ws.result("eval").write_text(
        json.dumps(
            {
                "targets": {
                    t: {"tinymath": {"pass_at_1": p, "majority_vote": p}}
                    for t, p in (("sft", 0.5), ("distill", 0.8), ("teacher", 1.0))
                }
            }
        )
    )
    run = load_run(Path(__file__).resolve().parents[2] / "examples" / "tiny-math-rl.yaml")
    echoed: list[str] = []
    out = write_report(run, ws, {}, [], echo=echoed.append)
    assert [a["model"] for a in out["accuracy"]] == ["after SFT", "after RL", "teacher"]
    assert out["gap_closed"] == {"tinymath": pytest.approx(0.6)}
    assert "RL closed 60% of the SFT -> teacher gap on tinymath" in echoed
    assert not [line for line in echoed if "OPD" in line]
    assert not (tmp_path / "models").exists()  # a report reads; it never builds the tiny world (minutes, cold)


def eval_summary(ws: Workspace, accuracies: dict[str, float]) -> None:
    ws.result("eval").parent.mkdir(parents=True, exist_ok=True)
    ws.result("eval").write_text(
        json.dumps({"targets": {t: {"tinymath": {"pass_at_1": p, "majority_vote": p}} for t, p in accuracies.items()}})
    )


def test_compare_sets_the_rl_baseline_beside_the_demo(tmp_path: Path):
    """`opd report --compare` (make compare): OPD and RL from the same SFT accuracy, with each one's
    budget, gap closed and compute; RL's compute has no teacher term."""
    root = Path(__file__).resolve().parents[2] / "examples"
    opd_run, rl_run = load_run(root / "tiny-math.yaml"), load_run(root / "tiny-math-rl.yaml")
    opd_ws, rl_ws = Workspace(tmp_path / "opd"), Workspace(tmp_path / "rl")
    eval_summary(opd_ws, {"sft": 0.5, "distill": 0.8, "teacher": 1.0})
    eval_summary(rl_ws, {"sft": 0.5, "distill": 0.7, "teacher": 1.0})
    for ws in (opd_ws, rl_ws):  # two steps of 100 tokens each; parameters from a tiny safetensors file
        write_lines(ws.metrics("distill"), [{"step": s, "completion_tokens": 100, "reverse_kl": 0.1} for s in (1, 2)])
    params = tmp_path / "params"
    params.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [10, 10], "data_offsets": [0, 400]}}).encode()
    (params / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(400))
    for run in (opd_run, rl_run):
        run.spec.student.model = run.spec.teacher.model = str(params)
    rows, lines = comparison(
        [Side("demo", opd_run, opd_ws, {"distill": {"seconds": 300.0}}), Side("rl", rl_run, rl_ws, {})]
    )
    assert [(r.method, r.budget, r.after, r.gap_closed) for r in rows] == [
        ("OPD", "200 × 32 × 4", 0.8, pytest.approx(0.6)),
        ("RL", "200 × 32 × 4", 0.7, pytest.approx(0.4)),
    ]
    # 200 tokens x 100 parameters: OPD 8 (student) + 2 (teacher scoring) FLOPs a parameter-token, RL 8
    assert (rows[0].flops, rows[1].flops) == (pytest.approx(200 * 100 * 10.0), pytest.approx(200 * 100 * 8.0))
    assert "| demo | OPD | 200 × 32 × 4 | tinymath | 50.0% | 80.0% | 100.0% | 60% | 2.00e+05 FLOP | 300 s |" in lines
    assert any("+10.0 points for 1.25× the compute" in line for line in lines)
    # the report has the section; runs from different SFT accuracies are said not to compare
    eval_summary(rl_ws, {"sft": 0.4, "distill": 0.7, "teacher": 1.0})
    echoed: list[str] = []
    out = write_report(opd_run, opd_ws, {}, [], echo=echoed.append, compare=[Side("rl", rl_run, rl_ws, {})])
    report = (opd_ws.root / "report.md").read_text()
    assert (
        "## Compared" in report
        and "did not start from the same SFT accuracy (40.0%, 50.0%): their gains do not compare." in report
    )
    assert [r["method"] for r in out["compared"]] == ["OPD", "RL"] and "compared:" in echoed
    assert comparison([Side("a", opd_run, Workspace(tmp_path / "empty"), {})]) == (
        [],
        ["Nothing to compare: no eval results (results/eval.json) in a.", ""],
    )


def test_compare_names_the_flag_when_the_other_workdir_is_not_a_run(tmp_path: Path, capsys):
    from opd_runtime.cli import EXIT_BAD_CONFIG, main

    ws = tmp_path / "demo"
    ws.mkdir()
    (ws / "run.yaml").write_text((Path(__file__).resolve().parents[2] / "examples" / "tiny-math.yaml").read_text())
    assert main(["report", "--workspace", str(ws), "--compare", str(tmp_path / "nothing")]) == EXIT_BAD_CONFIG
    assert "--compare" in capsys.readouterr().err and not (ws / "report.md").exists()
