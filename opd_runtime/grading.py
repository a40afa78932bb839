"""Extracting and comparing final answers.

The answer is the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``; braces may nest).
A completion without one is wrong, never an error.

Two kinds of comparison (``kind``):

- ``aime``: integer answers compare as integers, so ``\\boxed{025}`` equals 25. A numeral whose value is
  an integer also counts (``25.0`` and ``25.00`` equal 25; ``25.5`` does not), as do thousands separators
  and ``\\text{25}``. Anything else in the box (``\\frac{50}{2}``, ``x=25``) is wrong. A reference answer
  that is not an integer is compared the ``math`` way.
- ``math``: equal integers or equal normalised strings are correct at once; otherwise math-verify decides
  (``verify(gold, answer)``, gold first) whether the two are the same mathematical object (1/2 = \\frac12
  = 0.5, sets, intervals, equations...). When math-verify is not installed or raises, the normalised
  string comparison stands.

Grading never hangs and never crashes on garbage. math-verify runs with its own (``signal.alarm``)
timeouts off, in worker processes (``grade_worker.py``) that are killed when a comparison exceeds its
time limit (``timeout_s``); a comparison that times out, or kills its worker, is graded wrong. Answers
longer than ``MAX_VERIFY_CHARS`` are compared as strings only. Extraction is linear in the text length.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

KINDS = ("aime", "math")
DEFAULT_TIMEOUT_S = 5.0
MAX_VERIFY_CHARS = 1000  # longer answers (or references) skip math-verify
WORKER_START_TIMEOUT_S = 120.0  # importing sympy + math-verify takes ~2 s on an idle core

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_INT = re.compile(r"^[+-]?\d+$")
_INTEGRAL_DECIMAL = re.compile(r"^([+-]?\d+)\.0*$")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text`` (the complete one that starts last), or None.

    One pass over the braces with a stack, so unbalanced or adversarial text costs linear time.
    """
    openers = {m.end() - 1 for m in _BOXED.finditer(text)}
    if not openers:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    for m in _BRACE.finditer(text):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            start = stack.pop()
            if start in openers and (best is None or start > best[0]):
                best = (start, i)
    return None if best is None else text[best[0] + 1 : best[1]]


def as_int(text: str) -> int | None:
    """The integer a short answer denotes (``025``, ``1,000``, ``\\text{25}``, ``25.0``), else None."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    if _INT.match(s):
        return int(s)
    m = _INTEGRAL_DECIMAL.match(s)
    return int(m.group(1)) if m else None


def is_correct_integer(completion: str, answer: str | int) -> bool:
    boxed = last_boxed(completion)
    if boxed is None:
        return False
    got, want = as_int(boxed), as_int(str(answer))
    return got is not None and want is not None and got == want


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|\\left|\\right|\\displaystyle")


def normalize(answer: str) -> str:
    """A canonical string for comparing answers and counting votes: integers as ``str(int)``, otherwise
    without ``$``, spacing commands, ``\\left``/``\\right``, ``\\text{}`` wrappers, whitespace and a
    trailing period, with ``\\dfrac``/``\\tfrac`` as ``\\frac``."""
    n = as_int(answer) if len(answer) < 100 else None
    if n is not None:
        return str(n)
    s = answer.replace("$", "")
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = "".join(s.split()).rstrip(".")
    return s


def gold_answer(answer) -> str:
    """A reference answer as text; a reference written as a solution with a boxed answer gives the box."""
    text = str(answer)
    boxed = last_boxed(text) if "\\boxed" in text or "\\fbox" in text else None
    return boxed if boxed is not None else text


@dataclass(frozen=True)
class Graded:
    correct: bool
    extracted: str | None  # content of the last complete \boxed{}, None when there is none
    key: str | None  # normalised answer (what majority voting counts), None when there is none
    method: str  # none | integer | string | math-verify | timeout | error | unavailable | too-long


@dataclass(frozen=True)
class _Pending:
    extracted: str
    key: str
    gold: str


def _judge_fast(completion: str, answer, kind: str) -> Graded | _Pending:
    """Everything that needs no math-verify; a ``_Pending`` when math-verify must decide."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    extracted = last_boxed(completion)
    if extracted is None:
        return Graded(False, None, None, "none")
    gold = gold_answer(answer)
    key = normalize(extracted)
    want = as_int(gold) if len(gold) < 100 else None
    if want is not None:
        got = as_int(extracted) if len(extracted) < 100 else None
        if got is not None or kind == "aime":
            return Graded(got == want, extracted, key, "integer")
    if key == normalize(gold):
        return Graded(True, extracted, key, "string")
    if len(extracted) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return Graded(False, extracted, key, "too-long")
    return _Pending(extracted, key, gold)


# --- math-verify in killable worker processes ------------------------------------------------------------

_WORKER_SCRIPT = Path(__file__).with_name("grade_worker.py")


class _Worker:
    """One ``grade_worker.py`` child, speaking one JSON object per line over its stdin/stdout."""

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


def _shared_pool(workers: int | None) -> VerifyPool:
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = VerifyPool(workers)
            atexit.register(_default_pool.close)
        elif workers:
            _default_pool.size = workers
        return _default_pool


# --- the public API --------------------------------------------------------------------------------------


def judge_many(
    items: Iterable[Sequence],
    kind: str = "math",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
    pool: VerifyPool | None = None,
) -> list[Graded]:
    """Grade ``(completion, answer)`` or ``(completion, answer, kind)`` items (``kind`` is the default),
    with the extracted answer and how each verdict was reached."""
    fast: list[Graded | _Pending] = []
    for item in items:
        completion, answer, *rest = item
        fast.append(_judge_fast(completion, answer, rest[0] if rest and rest[0] else kind))
    todo: dict[
        tuple[str, str], int
    ] = {}  # (gold, extracted) -> index of its first occurrence; identical comparisons run once
    for g in fast:
        if isinstance(g, _Pending):
            todo.setdefault((g.gold, g.extracted), len(todo))
    verdicts: list[tuple[bool | None, str]] = []
    if todo:
        verdicts = (pool or _shared_pool(workers)).compare(list(todo), timeout_s)
    out = []
    for g in fast:
        if isinstance(g, _Pending):
            ok, method = verdicts[todo[(g.gold, g.extracted)]]
            # fallback: the normalised strings, which already differ (else no math-verify was needed)
            out.append(Graded(bool(ok), g.extracted, g.key, method))
        else:
            out.append(g)
    return out


def grade_many(
    items: Iterable[Sequence], kind: str = "math", timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None
) -> list[bool]:
    """Correctness of each ``(completion, answer)`` (or ``(completion, answer, kind)``) item."""
    return [g.correct for g in judge_many(items, kind, timeout_s=timeout_s, workers=workers)]


def judge(completion: str, answer, kind: str = "math", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Graded:
    return judge_many([(completion, answer)], kind, timeout_s=timeout_s)[0]


def grade(completion: str, answer, kind: str = "math", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Is the last boxed answer of ``completion`` the reference ``answer``? (See the module docstring.)"""
    return judge(completion, answer, kind, timeout_s=timeout_s).correct


# --- `opd grade`: a JSON-lines file of completions ----------------------------------------------------------


class GradeInputError(ValueError):
    """A grading input file that cannot be used; the message names the file and line."""


def read_grade_file(path: str | Path, default_kind: str = "math") -> list[tuple[int, str, str, str]]:
    """(line number, completion, answer, kind) for every non-blank line of a JSON-lines file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as err:
        raise GradeInputError(f"{path}: cannot read: {err}") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise GradeInputError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(rec, dict):
            raise GradeInputError(
                f"{where}: expected a JSON object with `completion` and `answer`, got {type(rec).__name__}"
            )
        for name in ("completion", "answer"):
            if name not in rec:
                raise GradeInputError(
                    f"{where}: missing field `{name}` (each line needs `completion` and `answer`, and may set `kind`)"
                )
        if not isinstance(rec["completion"], str):
            raise GradeInputError(f"{where}: `completion` must be a string, got {type(rec['completion']).__name__}")
        answer = rec["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise GradeInputError(f"{where}: `answer` must be a string or a number, got {json.dumps(answer)}")
        kind = rec.get("kind") or default_kind
        if kind not in KINDS:
            raise GradeInputError(f"{where}: `kind` must be one of {', '.join(KINDS)}, got {kind!r}")
        out.append((n, rec["completion"], str(answer), kind))
    if not out:
        raise GradeInputError(f"{path}: no lines to grade")
    return out


def grade_file(
    path: str | Path,
    *,
    default_kind: str = "math",
    output: str | Path | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
) -> dict:
    """Grade a JSON-lines file; with ``output``, write one result line per input line."""
    rows = read_grade_file(path, default_kind)
    graded = judge_many([(c, a, k) for _, c, a, k in rows], default_kind, timeout_s=timeout_s, workers=workers)
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            for (n, _, answer, kind), g in zip(rows, graded):
                f.write(json.dumps({"line": n, "answer": answer, "kind": kind, **asdict(g)}) + "\n")
        os.replace(tmp, out)
    correct = sum(g.correct for g in graded)
    return {"correct": correct, "total": len(graded), "accuracy": correct / len(graded)}
