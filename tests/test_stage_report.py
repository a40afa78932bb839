"""The stage side of the operator's channels: termination-message results and status.progress reports."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from opd_runtime import stage_report
from opd_runtime.stage_report import ProgressReporter, StatusPatcher, compact, result_message


def test_result_messages_are_compact_json():
    msg = result_message("distill", {"steps": 150, "reverse_kl_last": 0.2123456789, "final_model": "/w/final"})
    assert msg == {"stage": "distill", "step": 150, "reverse_kl": 0.212346, "checkpoint": "/w/final"}
    summary = {"stage": "eval", "targets": {"student": {"aime24": {"pass_at_1": 0.1}},
                                             "distill": {"aime24": {"pass_at_1": 0.4}, "gsm8k": {"pass_at_1": 0.7}}}}
    msg = result_message("eval", summary)
    assert msg["eval_score"] == 0.4 and msg["scores"]["distill/gsm8k"] == 0.7


def test_compact_stays_within_the_kubelet_limit():
    big = {"stage": "eval", "eval_score": 0.5, "scores": {f"t/{i:04d}": 0.5 for i in range(1000)}}
    text = compact(big)
    assert len(text.encode()) <= 4096 and json.loads(text)["eval_score"] == 0.5
    err = compact({"stage": "sft", "exit_code": 1, "error": "x" * 10000})
    assert len(err.encode()) <= 4096 and json.loads(err)["error"].endswith("...")


class _Recorder(BaseHTTPRequestHandler):
    received: list = []

    def do_PATCH(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.received.append((self.path, self.headers["Content-Type"], self.headers["Authorization"],
                                   json.loads(body)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_progress_is_merge_patched_throttled_and_the_last_one_sent(tmp_path: Path):
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("sekret\n")
    _Recorder.received = []
    try:
        patcher = StatusPatcher("run1", "ns1", api=f"http://127.0.0.1:{server.server_port}", token_file=token,
                                ca_file=None)
        reporter = ProgressReporter("distill", 100, patcher, interval=0.3)
        for step in range(1, 21):
            reporter({"step": step, "reverse_kl": 1.0 / step})
            time.sleep(0.01)
        reporter.close()
    finally:
        server.shutdown()
    got = _Recorder.received
    assert 1 <= len(got) <= 4  # throttled
    path, ctype, auth, body = got[-1]
    assert path == "/apis/opd.dev/v1alpha1/namespaces/ns1/distillationruns/run1/status"
    assert ctype == "application/merge-patch+json" and auth == "Bearer sekret"
    progress = body["status"]["progress"]
    assert progress["stage"] == "distill" and progress["step"] == 20 and progress["totalSteps"] == 100
    assert progress["reverseKL"] == 0.05 and progress["updatedAt"].endswith("Z")


def test_an_unreachable_api_server_is_only_logged(tmp_path: Path, capsys):
    token = tmp_path / "token"
    token.write_text("t")
    patcher = StatusPatcher("r", "n", api="http://127.0.0.1:9", token_file=token, ca_file=None)
    reporter = ProgressReporter("sft", 10, patcher, interval=0.01)
    reporter({"step": 1})
    reporter.close()
    assert "progress not sent" in capsys.readouterr().err


def test_no_reporting_outside_a_pod(monkeypatch):
    for var in ("OPD_RUN_NAME", "OPD_RUN_NAMESPACE", "KUBERNETES_SERVICE_HOST", "OPD_TERMINATION_LOG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(stage_report, "TERMINATION_LOG", Path("/nonexistent/termination-log"))
    assert ProgressReporter.from_env("sft", 10) is None
    assert stage_report.termination_log_path() is None


def test_a_bad_config_leaves_its_error_in_the_termination_message(tmp_path: Path):
    bad = tmp_path / "run.yaml"
    bad.write_text("apiVersion: opd.dev/v1alpha1\nkind: DistillationRun\nspec:\n  student: {model: s}\n")
    log = tmp_path / "termination-log"
    proc = subprocess.run([sys.executable, "-m", "opd_runtime", "sft", "--config", str(bad), "--workspace",
                           str(tmp_path / "ws")], capture_output=True, text=True,
                          env={"PYTHONSAFEPATH": "1", "OPD_TERMINATION_LOG": str(log), "PATH": ""})
    assert proc.returncode == 2, proc.stderr
    msg = json.loads(log.read_text())
    assert msg["stage"] == "sft" and msg["exit_code"] == 2 and "spec.teacher" in msg["error"]
