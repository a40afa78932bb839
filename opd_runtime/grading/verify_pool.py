"""math-verify in killable worker processes (``worker.py``): a comparison that overruns its time limit
kills its worker and is graded wrong, so grading never hangs on adversarial input.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0
WORKER_START_TIMEOUT_S = 120.0  # importing sympy + math-verify takes ~2 s on an idle core

_WORKER_SCRIPT = Path(__file__).with_name("worker.py")


class _Worker:
    """One ``worker.py`` child, speaking one JSON object per line over its stdin/stdout."""

    def __init__(self):
        env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
        code = f"import runpy; runpy.run_path({str(_WORKER_SCRIPT)!r}, run_name='__main__')"
        # A neutral working directory: a checkout's folders (operator/) must not shadow stdlib modules.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.fd = self.stdout.fileno()
        self.buf = b""
        self.state = "starting"  # starting | idle | busy | dead
        self.item: int | None = None
        self.deadline = time.monotonic() + WORKER_START_TIMEOUT_S

    @property
    def current(self) -> int:
        """The item a busy worker is grading."""
        assert self.item is not None, f"the worker is {self.state}, not grading"
        return self.item

    def send(self, item: int, gold: str, pred: str, timeout_s: float) -> None:
        msg = json.dumps({"gold": gold, "pred": pred, "alarm": int(timeout_s) + 2}) + "\n"
        self.stdin.write(msg.encode())
        self.stdin.flush()
        self.state, self.item, self.deadline = "busy", item, time.monotonic() + timeout_s

    def read_messages(self) -> list[dict] | None:
        """Complete messages available now; None at end of file (the worker died)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def kill(self) -> None:
        self.state = "dead"
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for f in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                f.close()


class VerifyPool:
    """Worker processes that run math-verify comparisons with a per-comparison time limit.

    ``compare`` returns, for every (gold, prediction) pair: True/False (math-verify's verdict; False too
    on a timeout or a crashed worker) or None (math-verify is unavailable or raised: fall back). Workers
    start on first use and are reused; ``close`` (or the end of the process) stops them.
    """

    def __init__(self, workers: int | None = None):
        self.size = max(1, workers or default_workers())
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.available: bool | None = None  # unknown until a worker has started
        self.timeouts = 0
        self._cache: dict[tuple[str, str], tuple[bool | None, str]] = {}

    def __enter__(self) -> VerifyPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.kill()
            self._workers = []

    def compare(
        self,
        pairs: Sequence[tuple[str, str]],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> list[tuple[bool | None, str]]:
        """(verdict, method) per pair; method is math-verify, timeout, error or unavailable."""
        pairs = list(pairs)
        with self._lock:
            new = list(dict.fromkeys(p for p in pairs if p not in self._cache))
            verdicts = dict(zip(new, self._compare(new, timeout_s))) if new else {}
            if len(self._cache) > 100_000:
                self._cache.clear()
            # verdicts only: a later call may give a timed-out comparison more time
            self._cache.update((p, v) for p, v in verdicts.items() if v[1] in ("math-verify", "error"))
            return [verdicts[p] if p in verdicts else self._cache[p] for p in pairs]

    def _compare(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[tuple[bool | None, str]]:
        out: list[tuple[bool | None, str] | None] = [None] * len(pairs)
        if self.available is False:
            return [(None, "unavailable")] * len(pairs)
        todo = deque(range(len(pairs)))
        self._workers = [w for w in self._workers if w.state != "dead" and w.proc.poll() is None]
        while self._workers[self.size :]:
            self._workers.pop().kill()
        while todo or any(w.state == "busy" for w in self._workers):
            live = [w for w in self._workers if w.state != "dead"]
            while todo and len(live) < min(self.size, len(todo) + sum(w.state == "busy" for w in live)):
                try:
                    live.append(_Worker())
                except OSError:  # cannot start a process here
                    self._workers = live
                    return self._give_up(out, todo)
            self._workers = live
            for w in live:
                if w.state == "idle" and todo:
                    i = todo.popleft()
                    try:
                        w.send(i, pairs[i][0], pairs[i][1], timeout_s)
                    except OSError:  # died while idle: put the item back, a fresh worker takes it
                        todo.appendleft(i)
                        w.kill()
            waiting = [w for w in live if w.state in ("starting", "busy")]
            if not waiting:
                continue
            wait = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            readable, _, _ = select.select([w.fd for w in waiting], [], [], wait)
            for w in waiting:
                if w.fd in readable:
                    msgs = w.read_messages()
                    if msgs is None:  # the worker died
                        if w.state == "starting":
                            return self._give_up(out, todo)
                        out[w.current] = (False, "error")
                        w.kill()
                        continue
                    for msg in msgs:
                        if "ready" in msg:
                            self.available = bool(msg["ready"])
                            if not self.available:
                                return self._give_up(out, todo)
                            w.state = "idle"
                        elif w.state == "busy":
                            ok = msg.get("ok")
                            out[w.current] = (None, "error") if ok is None else (bool(ok), "math-verify")
                            w.state, w.item = "idle", None
                elif time.monotonic() >= w.deadline:
                    if w.state == "starting":  # cannot even start in time: no math-verify
                        return self._give_up(out, todo)
                    out[w.current] = (False, "timeout")
                    self.timeouts += 1
                    w.kill()
        return out  # type: ignore[return-value]

    def _give_up(self, out: list, todo: deque) -> list[tuple[bool | None, str]]:
        """Workers cannot start here (math-verify missing, or a broken environment): fall back."""
        for w in self._workers:
            if w.state == "busy":
                todo.append(w.item)
            w.kill()
        self._workers = []
        self.available = False
        for i in todo:
            out[i] = (None, "unavailable")
        return [o if o is not None else (None, "unavailable") for o in out]


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))


_default_pool: VerifyPool | None = None
_default_lock = threading.Lock()


def shared_pool(workers: int | None) -> VerifyPool:
    """The process's pool, started on first use and stopped at exit; ``workers`` resizes it."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = VerifyPool(workers)
            atexit.register(_default_pool.close)
        elif workers:
            _default_pool.size = workers
        return _default_pool
