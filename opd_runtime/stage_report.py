"""What a stage process tells the operator: progress while it runs, its result when it ends.

Two channels, both torch-free (stdlib and ``opd_runtime.contract`` only):

- **Result**: at the end, the stage writes one compact JSON object (at most 4 KiB; the kubelet keeps no
  more) to its container's termination-message file, ``$OPD_TERMINATION_LOG`` or ``/dev/termination-log``
  when that exists. The operator reads it from the finished pod's ``state.terminated.message``:
  ``{"stage": "distill", "step": 150, "reverse_kl": 0.21, "checkpoint": "/workspace/checkpoints/distill/final"}``,
  ``{"stage": "eval", "eval_score": 0.41, "scores": {"distill/aime24": 0.41}}``, or on a handled failure
  ``{"stage": "sft", "exit_code": 2, "error": "spec.sft.dataset: ..."}``. An unhandled crash leaves the file
  empty and the pod's ``terminationMessagePolicy: FallbackToLogsOnError`` puts the log's tail there.
- **Progress**: with ``OPD_RUN_NAME`` and ``OPD_RUN_NAMESPACE`` set (the operator sets them), the stage
  merge-patches ``status.progress`` of its DistillationRun ({stage, step, totalSteps, reverseKL,
  updatedAt}) through the API server, as the pod's ServiceAccount ``<run>-stage``, whose Role allows only
  get/patch of that run's status. Reports go from a background thread at most every
  ``OPD_PROGRESS_INTERVAL`` seconds (default 10) plus the last one at the end; a failed report is logged and
  training goes on.

The API server, token and CA default to the in-cluster ones; ``OPD_KUBE_API``, ``OPD_KUBE_TOKEN_FILE`` and
``OPD_KUBE_CA_FILE`` override them (tests post progress from outside a pod this way).
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .contract import API_VERSION, PLURAL

TERMINATION_LOG = Path("/dev/termination-log")
MAX_MESSAGE_BYTES = 4096
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Headline eval score: the last trained model the eval scored, on the first dataset.
HEADLINE_TARGETS = ("distill", "sft")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


# ---- result: the termination message ------------------------------------------------------------------


def termination_log_path() -> Path | None:
    env = os.environ.get("OPD_TERMINATION_LOG")
    if env:
        return Path(env)
    return TERMINATION_LOG if TERMINATION_LOG.exists() else None


def compact(message: dict[str, Any], limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` as compact JSON of at most ``limit`` bytes: drops ``scores`` entries, then shortens
    ``error``, until it fits."""
    msg = dict(message)

    def dump() -> str:
        return json.dumps(msg, separators=(",", ":"), ensure_ascii=False)

    text = dump()
    while len(text.encode()) > limit and msg.get("scores"):
        scores = dict(msg["scores"])
        scores.popitem()
        msg["scores"] = scores
        text = dump()
    if len(text.encode()) > limit and isinstance(msg.get("error"), str):
        over = len(text.encode()) - limit
        msg["error"] = (
            msg["error"].encode()[: max(0, len(msg["error"].encode()) - over - 16)].decode(errors="ignore") + " ..."
        )
        text = dump()
    if len(text.encode()) > limit:
        text = json.dumps({"stage": msg.get("stage"), "truncated": True})
    return text


def headline_score(eval_summary: dict[str, Any]) -> float | None:
    targets: dict[str, dict] = eval_summary.get("targets") or {}
    name = next((t for t in HEADLINE_TARGETS if t in targets), next(iter(targets), None))
    if name is None or not targets[name]:
        return None
    first = next(iter(targets[name].values()))
    return _round(first.get("pass_at_1"))


def result_message(stage: str, result: dict[str, Any]) -> dict[str, Any]:
    """The summary the operator needs from a stage's result (see the module docstring)."""
    msg: dict[str, Any] = {"stage": stage}
    if stage == "eval":
        msg["eval_score"] = headline_score(result)
        msg["scores"] = {
            f"{t}/{label}": _round(r.get("pass_at_1"))
            for t, per in (result.get("targets") or {}).items()
            for label, r in per.items()
        }
    else:
        msg["step"] = result.get("steps")
        if result.get("reverse_kl_last") is not None:
            msg["reverse_kl"] = _round(result["reverse_kl_last"])
        if result.get("loss_last") is not None:
            msg["loss"] = _round(result["loss_last"])
        msg["checkpoint"] = result.get("final_model")
    return msg


def _write(message: dict[str, Any]) -> None:
    path = termination_log_path()
    if path is None:
        return
    try:
        path.write_text(compact(message))
    except OSError as err:
        print(f"stage report: cannot write the termination message to {path}: {err}", file=sys.stderr)


def failure_message(stage: str, exit_code: int, error: str) -> dict[str, Any]:
    return {"stage": stage, "exit_code": exit_code, "error": error}


# ---- progress: status.progress through the API server -------------------------------------------------


class StatusPatcher:
    """Merge-patches ``status`` of one DistillationRun with the pod's ServiceAccount token (stdlib HTTP)."""

    def __init__(self, name: str, namespace: str, *, api: str, token_file: Path, ca_file: Path | None):
        self.url = f"{api.rstrip('/')}/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else ssl.create_default_context()

    @classmethod
    def from_env(cls) -> StatusPatcher | None:
        name, namespace = os.environ.get("OPD_RUN_NAME"), os.environ.get("OPD_RUN_NAMESPACE")
        if not name or not namespace:
            return None
        api = os.environ.get("OPD_KUBE_API")
        if not api:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                return None
            api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        token = Path(os.environ.get("OPD_KUBE_TOKEN_FILE") or SA_DIR / "token")
        ca = Path(os.environ.get("OPD_KUBE_CA_FILE") or SA_DIR / "ca.crt")
        return cls(name, namespace, api=api, token_file=token, ca_file=ca if ca.exists() else None)

    def patch(self, status: dict[str, Any], timeout: float = 5.0) -> None:
        body = json.dumps({"status": status}).encode()
        req = urllib.request.Request(
            self.url,
            data=body,
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
                "Authorization": f"Bearer {self.token_file.read_text().strip()}",
            },
        )  # re-read: tokens rotate
        with urllib.request.urlopen(req, timeout=timeout, context=self.context) as resp:
            resp.read()


class ProgressReporter:
    """Sends a stage's latest step to ``status.progress``, throttled, from a background thread.

    Call it with each metrics record (``{"step": ..., "reverse_kl": ...}``); ``close()`` stops the thread
    and then sends the latest record if the thread had not. Only one send is in flight at a time and
    records go out in the order they came: the thread sends while the reporter is open, ``close()`` only
    after joining it, so an older record can never land after a newer one.
    """

    def __init__(self, stage: str, total_steps: int | None, patcher: StatusPatcher, *, interval: float = 10.0):
        self.stage, self.total_steps, self.patcher, self.interval = stage, total_steps, patcher, interval
        self._latest: dict[str, Any] | None = None
        self._latest_seq = 0  # sequence number of ``_latest``; 0 = no record yet
        self._sent_seq = 0  # sequence number of the last record sent
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="opd-progress", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, stage: str, total_steps: int | None) -> ProgressReporter | None:
        patcher = StatusPatcher.from_env()
        if patcher is None:
            return None
        return cls(stage, total_steps, patcher, interval=float(os.environ.get("OPD_PROGRESS_INTERVAL", "10")))

    def progress(self, record: dict[str, Any]) -> dict[str, Any]:
        # Explicit nulls: a merge patch then clears what an earlier stage reported.
        return {
            "stage": self.stage,
            "step": record.get("step"),
            "totalSteps": self.total_steps,
            "reverseKL": _round(record.get("reverse_kl")),
            "updatedAt": _now(),
        }

    def __call__(self, record: dict[str, Any]) -> None:
        with self._cond:
            self._latest = self.progress(record)
            self._latest_seq += 1
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _send(self, progress: dict[str, Any]) -> None:
        try:
            self.patcher.patch({"progress": progress})
        except (OSError, urllib.error.URLError, ValueError) as err:
            detail = err.read().decode(errors="replace")[:300] if isinstance(err, urllib.error.HTTPError) else ""
            print(f"stage report: progress not sent ({err}) {detail}".rstrip(), file=sys.stderr, flush=True)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._latest_seq > self._sent_seq)
                if self._closed:
                    return
                latest, self._sent_seq = self._latest, self._latest_seq
            if latest is not None:
                self._send(latest)  # outside the lock: training never waits for the API server
            with self._cond:  # throttle; close() cuts the wait short
                self._cond.wait_for(lambda: self._closed, timeout=self.interval)

    def close(self) -> None:
        """Stop and join the thread, then send the latest record if it was not sent yet. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()  # an in-flight send finishes first (each send times out after 5 s)
        with self._cond:
            latest = self._latest if self._latest_seq > self._sent_seq else None
            self._sent_seq = self._latest_seq
        if latest is not None:
            self._send(latest)


class StageReport:
    """Both channels for one stage command: progress while it runs, the result (or failure) at the end.

    ``opd <stage>`` creates one before it runs the stage; the stage calls ``begin(total_steps)`` once it
    knows its length (which starts progress reporting when the operator asked for it) and ``on_step``
    with each metrics record. Exactly one of ``done`` and ``failed`` ends it: both stop the progress
    thread (sending the last record) and write the termination message.
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.reporter: ProgressReporter | None = None
        self.finished = False

    def begin(self, total_steps: int | None = None) -> None:
        if self.reporter is None and not self.finished:
            self.reporter = ProgressReporter.from_env(self.stage, total_steps)

    def on_step(self, record: dict[str, Any]) -> None:
        if self.reporter is not None:
            self.reporter(record)

    def _finish(self, message: dict[str, Any]) -> None:
        if self.finished:
            return
        self.finished = True
        if self.reporter is not None:
            self.reporter.close()
        _write(message)

    def done(self, result: dict[str, Any]) -> None:
        self._finish(result_message(self.stage, result))

    def failed(self, exit_code: int, error: str) -> None:
        self._finish(failure_message(self.stage, exit_code, error))
