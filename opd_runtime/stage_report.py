"""What a stage process tells the operator: progress while it runs, its result when it ends.

Two channels, both torch-free and stdlib-only:

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
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

TERMINATION_LOG = Path("/dev/termination-log")
MAX_MESSAGE_BYTES = 4096
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GROUP_VERSION = "opd.dev/v1alpha1"
PLURAL = "distillationruns"
# Headline eval score: the last trained model the eval scored, on the first dataset.
HEADLINE_TARGETS = ("distill", "sft")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


# ---- result: the termination message ------------------------------------------------------------------

def termination_log_path() -> Optional[Path]:
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
        msg["error"] = msg["error"].encode()[: max(0, len(msg["error"].encode()) - over - 16)].decode(
            errors="ignore") + " ..."
        text = dump()
    if len(text.encode()) > limit:
        text = json.dumps({"stage": msg.get("stage"), "truncated": True})
    return text


def headline_score(eval_summary: dict[str, Any]) -> Optional[float]:
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
        msg["scores"] = {f"{t}/{label}": _round(r.get("pass_at_1"))
                         for t, per in (result.get("targets") or {}).items() for label, r in per.items()}
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


def write_result(stage: str, result: dict[str, Any]) -> None:
    _write(result_message(stage, result))


def write_failure(stage: str, exit_code: int, error: str) -> None:
    _write({"stage": stage, "exit_code": exit_code, "error": error})


# ---- progress: status.progress through the API server -------------------------------------------------

class StatusPatcher:
    """Merge-patches ``status`` of one DistillationRun with the pod's ServiceAccount token (stdlib HTTP)."""

    def __init__(self, name: str, namespace: str, *, api: str, token_file: Path, ca_file: Optional[Path]):
        self.url = f"{api.rstrip('/')}/apis/{GROUP_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else ssl.create_default_context()

    @classmethod
    def from_env(cls) -> Optional["StatusPatcher"]:
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
        req = urllib.request.Request(self.url, data=body, method="PATCH", headers={
            "Content-Type": "application/merge-patch+json", "Accept": "application/json",
            "Authorization": f"Bearer {self.token_file.read_text().strip()}"})  # re-read: tokens rotate
        with urllib.request.urlopen(req, timeout=timeout, context=self.context) as resp:
            resp.read()


class ProgressReporter:
    """Sends a stage's latest step to ``status.progress``, throttled, from a background thread.

    Call it with each metrics record (``{"step": ..., "reverse_kl": ...}``); ``close()`` sends the last one.
    """

    def __init__(self, stage: str, total_steps: Optional[int], patcher: StatusPatcher, *,
                 interval: float = 10.0):
        self.stage, self.total_steps, self.patcher, self.interval = stage, total_steps, patcher, interval
        self._latest: Optional[dict[str, Any]] = None
        self._sent: Optional[dict[str, Any]] = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="opd-progress", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, stage: str, total_steps: Optional[int]) -> Optional["ProgressReporter"]:
        patcher = StatusPatcher.from_env()
        if patcher is None:
            return None
        return cls(stage, total_steps, patcher, interval=float(os.environ.get("OPD_PROGRESS_INTERVAL", "10")))

    def progress(self, record: dict[str, Any]) -> dict[str, Any]:
        # Explicit nulls: a merge patch then clears what an earlier stage reported.
        return {"stage": self.stage, "step": record.get("step"), "totalSteps": self.total_steps,
                "reverseKL": _round(record.get("reverse_kl")), "updatedAt": _now()}

    def __call__(self, record: dict[str, Any]) -> None:
        with self._cond:
            self._latest = self.progress(record)
            self._cond.notify()

    def _send(self, progress: dict[str, Any]) -> None:
        try:
            self.patcher.patch({"progress": progress})
        except (OSError, urllib.error.URLError, ValueError) as err:
            detail = err.read().decode(errors="replace")[:300] if isinstance(err, urllib.error.HTTPError) else ""
            print(f"stage report: progress not sent ({err}) {detail}".rstrip(), file=sys.stderr, flush=True)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._latest is None or self._latest is self._sent):
                    self._cond.wait()
                if self._closed:
                    return
                latest = self._sent = self._latest
            if latest is not None:
                self._send(latest)
            time.sleep(self.interval)

    def close(self) -> None:
        """Stop the thread and send the latest record if it was not sent yet."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            latest, sent = self._latest, self._sent
        if latest is not None and latest is not sent:
            self._send(latest)


class StageReport:
    """Both channels for one stage command: ``on_step`` for progress, ``done``/``failed`` for the result."""

    def __init__(self, stage: str, total_steps: Optional[int] = None):
        self.stage = stage
        self.reporter = ProgressReporter.from_env(stage, total_steps)

    def on_step(self, record: dict[str, Any]) -> None:
        if self.reporter is not None:
            self.reporter(record)

    def done(self, result: dict[str, Any]) -> None:
        if self.reporter is not None:
            self.reporter.close()
        write_result(self.stage, result)

    def failed(self, exit_code: int, error: str) -> None:
        if self.reporter is not None:
            self.reporter.close()
        write_failure(self.stage, exit_code, error)
