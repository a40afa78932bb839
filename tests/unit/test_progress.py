"""``opd run``'s progress view: it follows the records a stage appends to its metrics file, as a bar on a
terminal and as plain lines otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from opd_runtime.progress import PlainView, read_records, watcher_for
from opd_runtime.spec import parse_run
from opd_runtime.workspace import Workspace


def run_with_eval(n_datasets: int, targets: list[str]):
    return parse_run(
        {
            "apiVersion": "opd.dev/v1alpha1",
            "kind": "DistillationRun",
            "metadata": {"name": "p"},
            "spec": {
                "student": {"model": "s"},
                "teacher": {"model": "t", "backend": "local"},
                "eval": {
                    "datasets": [{"name": "tinymath", "split": "test", "label": f"d{i}"} for i in range(n_datasets)],
                    "targets": targets,
                },
            },
        }
    )


def test_read_records_returns_only_complete_lines(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    records, offset = read_records(path)
    assert [r["step"] for r in records] == [1, 2] and offset == len('{"step": 1}\n{"step": 2}\n')
    with path.open("a") as f:
        f.write('ep": 3}\n')
    records, _ = read_records(path, offset)
    assert records == [{"step": 3}]


def test_plain_view_prints_a_line_per_interval_with_rate_and_eta():
    now = [0.0]
    view = PlainView("eval", 4, 0, "problem set", every=30.0, clock=lambda: now[0])
    now[0] = 10.0
    view.update(1, {"step": 1, "target": "student", "dataset": "aime24", "pass_at_1": 0.25})  # < 30 s: quiet
    now[0] = 40.0
    assert (
        view.line(2, {"step": 2, "target": "student", "dataset": "aime24", "pass_at_1": 0.25})
        == "[eval] 2/4 problem sets  student/aime24 0.250  eta 40s"
    )


def test_the_watcher_follows_the_records_of_a_running_stage(tmp_path: Path, capsys, monkeypatch):
    """A real process appends eval's progress lines; the watcher (no terminal: plain lines) reports them."""
    monkeypatch.setattr("opd_runtime.progress.PLAIN_LINE_SECONDS", 0.0)
    monkeypatch.setattr("opd_runtime.progress.POLL_SECONDS", 0.05)
    ws = Workspace(tmp_path)
    ws.metrics("eval").parent.mkdir(parents=True)
    ws.metrics("eval").write_text(json.dumps({"step": 1, "target": "old", "dataset": "d0", "pass_at_1": 0.0}) + "\n")
    writer = (
        "import json, sys, time\n"
        "for step in (1, 2):\n"
        "    time.sleep(0.2)\n"
        "    with open(sys.argv[1], 'a') as f:\n"
        "        f.write(json.dumps({'step': step, 'target': 'student', 'dataset': f'd{step - 1}',"
        " 'pass_at_1': 0.5}) + '\\n')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(ws.metrics("eval"))])
    watcher_for("eval", run_with_eval(2, ["student"]), ws)(proc)
    out = capsys.readouterr().out
    assert proc.returncode == 0
    # the last line is read after the process ended; counted afresh: the earlier process's line is ignored
    assert out.splitlines()[-1].startswith("[eval] 2/2 problem sets  student/d1 0.500")
    assert "old" not in out


def test_training_views_show_the_mean_of_the_last_steps_beside_the_latest(tmp_path: Path, capsys, monkeypatch):
    """OPD's reverse KL jumps from step to step, so the view also shows the mean of the last MEAN_STEPS
    records: a resumed stage's earlier records count, and only the last MEAN_STEPS do."""
    monkeypatch.setattr("opd_runtime.progress.PLAIN_LINE_SECONDS", 0.0)
    monkeypatch.setattr("opd_runtime.progress.POLL_SECONDS", 0.05)
    monkeypatch.setattr("opd_runtime.progress.MEAN_STEPS", 4)
    ws = Workspace(tmp_path)
    ws.metrics("distill").parent.mkdir(parents=True)
    # a resumed stage: steps 1-3 were written by the earlier process (reverse KL 9, far above the rest)
    ws.metrics("distill").write_text("".join(json.dumps({"step": s, "reverse_kl": 9.0}) + "\n" for s in (1, 2, 3)))
    writer = (
        "import json, sys, time\n"
        "for step, kl in ((4, 1.0), (5, 3.0), (6, 1.0), (7, 3.0)):\n"
        "    time.sleep(0.2)\n"
        "    with open(sys.argv[1], 'a') as f:\n"
        "        f.write(json.dumps({'step': step, 'reverse_kl': kl}) + '\\n')\n"
    )
    run = parse_run(
        {
            "apiVersion": "opd.dev/v1alpha1",
            "kind": "DistillationRun",
            "metadata": {"name": "p"},
            "spec": {
                "student": {"model": "s"},
                "teacher": {"model": "t", "backend": "local"},
                "distill": {"prompts": {"name": "tinymath"}, "steps": 7},
            },
        }
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(ws.metrics("distill"))])
    watcher_for("distill", run, ws)(proc)
    lines = capsys.readouterr().out.splitlines()
    assert proc.returncode == 0
    # after step 4: (9 + 9 + 9 + 1) / 4; after step 7: (1 + 3 + 1 + 3) / 4, the resumed steps out of the window
    assert any(ln.startswith("[distill] 4/7 steps  rev_kl 1.000  mean4 7.000") for ln in lines), lines
    assert lines[-1].startswith("[distill] 7/7 steps  rev_kl 3.000  mean4 2.000"), lines
