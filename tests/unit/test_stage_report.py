"""The stage side of the operator's channels: termination-message results and status.progress reports."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from opd_runtime import stage_report
from opd_runtime.stage_report import ProgressReporter, StageReport, StatusPatcher, compact, result_message


def test_result_messages_are_compact_json():
    msg = result_message("distill", {"steps": 150, "reverse_kl_last": 0.2123456789, "final_model": "/w/final"})
    assert msg == {"stage": "distill", "step": 150, "reverse_kl": 0.212346, "checkpoint": "/w/final"}
    summary = {
        "stage": "eval",
        "targets": {
            "student": {"aime24": {"pass_at_1": 0.1}},
            "distill": {"aime24": {"pass_at_1": 0.4}, "gsm8k": {"pass_at_1": 0.7}},
        },
    }
    msg = result_message("eval", summary)
    assert msg["eval_score"] == 0.4 and msg["scores"]["distill/gsm8k"] == 0.7


def test_compact_stays_within_the_kubelet_limit():
    big = {"stage": "eval", "eval_score": 0.5, "scores": {f"t/{i:04d}": 0.5 for i in range(1000)}}
    text = compact(big)
    assert len(text.encode()) <= 4096 and json.loads(text)["eval_score"] == 0.5
    err = compact({"stage": "sft", "exit_code": 1, "error": "x" * 10000})
    assert len(err.encode()) <= 4096 and json.loads(err)["error"].endswith("...")


class FakeApiServer:
    """A real HTTP server standing in for the API server's status endpoint: records each merge patch's
    progress in the order it is applied; ``hold_first`` keeps the first patch in flight until
    ``release()`` (a slow network or API server)."""

    def __init__(self, *, hold_first: bool = False):
        self.patches: list[tuple[str, str, str, dict]] = []
        self.arrived = threading.Semaphore(0)  # one release per request that reached the server
        self._count = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        if not hold_first:
            self._release.set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner._lock:
                    owner._count += 1
                    first = owner._count == 1
                owner.arrived.release()
                if first:
                    owner._release.wait(timeout=30)
                owner.patches.append((self.path, self.headers["Content-Type"], self.headers["Authorization"], body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._release.set()

    def steps(self) -> list[int]:
        return [body["status"]["progress"]["step"] for *_, body in self.patches]

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(tmp_path: Path):
    server = FakeApiServer()
    yield server
    server.close()


def patcher_for(server: FakeApiServer, tmp_path: Path) -> StatusPatcher:
    token = tmp_path / "token"
    token.write_text("sekret\n")
    return StatusPatcher("run1", "ns1", api=server.url, token_file=token, ca_file=None)


def test_progress_is_merge_patched_throttled_and_the_last_one_sent(api: FakeApiServer, tmp_path: Path):
    # An interval far longer than the test: the first record goes out at once, the rest wait for close().
    reporter = ProgressReporter("distill", 100, patcher_for(api, tmp_path), interval=3600)
    reporter({"step": 1, "reverse_kl": 1.0})
    assert api.arrived.acquire(timeout=10), "the first record was not sent"
    for step in range(2, 21):
        reporter({"step": step, "reverse_kl": 1.0 / step})
    reporter.close()  # cuts the throttle's wait short: returns at once, not after an hour
    assert not reporter.alive
    assert api.steps() == [1, 20]  # throttled: steps 2..19 were superseded before they could go out
    path, ctype, auth, body = api.patches[-1]
    assert path == "/apis/opd.dev/v1alpha1/namespaces/ns1/distillationruns/run1/status"
    assert ctype == "application/merge-patch+json" and auth == "Bearer sekret"
    progress = body["status"]["progress"]
    assert progress["stage"] == "distill" and progress["step"] == 20 and progress["totalSteps"] == 100
    assert progress["reverseKL"] == 0.05 and progress["updatedAt"].endswith("Z")
    reporter.close()  # idempotent: nothing more is sent
    assert api.steps() == [1, 20]


def test_an_older_report_never_lands_after_the_last_one(tmp_path: Path):
    """The thread's send of step 1 is still in flight when close() has step 2 to send: close() waits for
    it, so the API server applies 1 then 2 (sending at once would apply 2 then, late, 1)."""
    api = FakeApiServer(hold_first=True)
    try:
        reporter = ProgressReporter("sft", 10, patcher_for(api, tmp_path), interval=3600)
        reporter({"step": 1})
        assert api.arrived.acquire(timeout=10)  # step 1 is in flight, held by the server
        reporter({"step": 2})
        closing = threading.Thread(target=reporter.close)
        closing.start()
        # Give a wrong close() the chance to overtake (a correct one sends nothing until step 1 is done).
        overtaken = api.arrived.acquire(timeout=1.0)
        api.release()
        closing.join(timeout=30)
        assert not closing.is_alive() and not reporter.alive
        assert not overtaken and api.steps() == [1, 2]
    finally:
        api.close()


def test_a_failed_stage_closes_its_progress_thread_and_writes_the_failure(
    api: FakeApiServer, tmp_path: Path, monkeypatch
):
    log = tmp_path / "termination-log"
    token = tmp_path / "token"
    token.write_text("t")
    for key, value in {
        "OPD_RUN_NAME": "run1",
        "OPD_RUN_NAMESPACE": "ns1",
        "OPD_KUBE_API": api.url,
        "OPD_KUBE_TOKEN_FILE": str(token),
        "OPD_TERMINATION_LOG": str(log),
        "OPD_PROGRESS_INTERVAL": "3600",
    }.items():
        monkeypatch.setenv(key, value)
    report = StageReport("distill")
    report.begin(total_steps=50)
    assert report.reporter is not None and report.reporter.alive
    report.on_step({"step": 1, "reverse_kl": 0.5})
    report.on_step({"step": 2, "reverse_kl": 0.25})
    report.failed(1, "RuntimeError: CUDA out of memory")
    assert not report.reporter.alive
    assert api.steps()[-1] == 2  # the last step reached the status before the process ends
    assert json.loads(log.read_text()) == {
        "stage": "distill",
        "exit_code": 1,
        "error": "RuntimeError: CUDA out of memory",
    }
    report.done({"steps": 2})  # a second ending changes nothing
    assert json.loads(log.read_text())["exit_code"] == 1


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
    proc = subprocess.run(
        [sys.executable, "-m", "opd_runtime", "sft", "--config", str(bad), "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        env={"PYTHONSAFEPATH": "1", "OPD_TERMINATION_LOG": str(log), "PATH": ""},
    )
    assert proc.returncode == 2, proc.stderr
    msg = json.loads(log.read_text())
    assert msg["stage"] == "sft" and msg["exit_code"] == 2 and "spec.teacher" in msg["error"]
