"""Progress of a running stage, read from the metrics file it appends to (``metrics/<stage>.jsonl``).

``opd run`` follows each stage: SFT and OPD append one record per optimizer step, eval one per finished
(target, problem set). The same records feed this view, the report and the operator's view of a pod.
On a terminal the view is a tqdm bar; otherwise (a log file, CI) a plain line every
``PLAIN_LINE_SECONDS``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .contract import TRAINING_STAGES
from .spec import DistillationRun
from .workspace import Workspace

POLL_SECONDS = 0.5
PLAIN_LINE_SECONDS = 30.0  # without a terminal, one progress line this often
# The training stages' headline number (OPD's reverse KL or RL reward, SFT's loss) is also shown as the
# mean of the last this many steps: one step's value moves by about +-0.1 from step to step on the tiny
# world (a batch of 32 x 4 samples), more than a run's trend over tens of steps.
MEAN_STEPS = 10


def read_records(path: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines from byte ``start`` on, and the offset after the last complete line."""
    if not path.exists():
        return [], start
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, start + end


def headline(stage: str, rec: dict[str, Any]) -> str | None:
    """The record's field a training stage's view leads with."""
    if stage == "distill":
        return "reverse_kl" if rec.get("reverse_kl") is not None else "reward_mean"
    return "loss" if stage in TRAINING_STAGES else None


class RecentMean:
    """The mean of a training stage's headline field over its last ``steps`` records (all records fed so
    far count, a resumed stage's earlier ones included)."""

    def __init__(self, stage: str, steps: int | None = None):
        self.stage, self.steps = stage, MEAN_STEPS if steps is None else steps
        self.values: dict[str, deque[float]] = {}

    def add(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            key = headline(self.stage, r)
            if key is not None and r.get(key) is not None:
                self.values.setdefault(key, deque(maxlen=self.steps)).append(float(r[key]))

    def of(self, key: str | None) -> tuple[float, int] | None:
        """(mean, number of steps in it) of ``key``, or None before its first value."""
        vals = self.values.get(key) if key is not None else None
        return (sum(vals) / len(vals), len(vals)) if vals else None


def postfix(stage: str, rec: dict[str, Any], recent: RecentMean | None = None) -> dict[str, str]:
    """What the view shows next to the step count; for SFT and OPD, given ``recent``, also the mean of the
    headline value over the last steps (``mean10`` for ten steps)."""
    shown = {}
    mean = recent.of(headline(stage, rec)) if recent is not None else None
    if stage == "distill" and rec.get("reverse_kl") is not None:
        shown["rev_kl"] = f"{rec['reverse_kl']:.3f}"
    elif stage == "distill" and rec.get("reward_mean") is not None:  # objective rl
        shown["reward"] = f"{rec['reward_mean']:.3f}"
    elif "loss" in rec:
        shown["loss"] = f"{rec['loss']:.3f}"
    elif "pass_at_1" in rec:
        shown[f"{rec['target']}/{rec['dataset']}"] = f"{rec['pass_at_1']:.3f}"
    if mean is not None:
        shown[f"mean{mean[1]}"] = f"{mean[0]:.3f}"
    if rec.get("tokens_per_second"):
        shown["tok/s"] = f"{rec['tokens_per_second']:.0f}"
    return shown


def total_steps(stage: str, run: DistillationRun) -> int | None:
    spec = run.spec
    if stage in TRAINING_STAGES:
        stage_spec = spec.sft if stage == "sft" else spec.distill
        return stage_spec.steps if stage_spec is not None else None
    if stage == "eval" and spec.eval is not None:
        return len(spec.eval.datasets) * len(spec.eval.targets)
    return None


class View(Protocol):
    def update(self, done: int, latest: dict[str, Any], recent: RecentMean | None = None) -> None: ...

    def close(self) -> None: ...


class BarView:
    """A tqdm bar on stderr (a terminal)."""

    def __init__(self, stage: str, total: int | None, initial: int, unit: str):
        from tqdm import tqdm

        self.stage, self.done = stage, initial
        self.bar = tqdm(total=total, initial=initial, desc=stage, unit=unit, dynamic_ncols=True)

    def update(self, done: int, latest: dict[str, Any], recent: RecentMean | None = None) -> None:
        self.bar.set_postfix(postfix(self.stage, latest, recent), refresh=False)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        self.bar.close()


class PlainView:
    """One line on stdout every ``every`` seconds while the stage advances (a log file, CI)."""

    def __init__(
        self,
        stage: str,
        total: int | None,
        initial: int,
        unit: str,
        *,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.total, self.initial, self.unit = stage, total, initial, unit
        self.every = PLAIN_LINE_SECONDS if every is None else every
        self.clock = clock
        self.started = self.last_line = clock()

    def line(self, done: int, latest: dict[str, Any], recent: RecentMean | None = None) -> str:
        extra = "  ".join(f"{k} {v}" for k, v in postfix(self.stage, latest, recent).items())
        elapsed = self.clock() - self.started
        rate = (done - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = f"  eta {(self.total - done) / rate:.0f}s" if rate and self.total else ""
        total = self.total if self.total is not None else "?"
        return f"[{self.stage}] {done}/{total} {self.unit}s  {extra}{eta}".rstrip()

    def update(self, done: int, latest: dict[str, Any], recent: RecentMean | None = None) -> None:
        if self.clock() - self.last_line >= self.every:
            self.last_line = self.clock()
            print(self.line(done, latest, recent), flush=True)

    def close(self) -> None:
        pass


def watcher_for(
    stage: str, run: DistillationRun, ws: Workspace, *, enabled: bool = True
) -> Callable[[subprocess.Popen[bytes]], None]:
    """A function that follows ``stage``'s progress until its process exits."""
    total = total_steps(stage, run)
    unit = "problem set" if stage == "eval" else "step"

    def watch(proc: subprocess.Popen[bytes]) -> None:
        if not enabled:
            return
        # A resumed training stage continues from its last recorded step; eval counts afresh (its records
        # restart at 1 in every eval process).
        records, offset = read_records(ws.metrics(stage))
        done = records[-1]["step"] if records and stage in TRAINING_STAGES else 0
        recent = RecentMean(stage)
        if stage in TRAINING_STAGES:
            recent.add(records)
        view: View = (BarView if sys.stderr.isatty() else PlainView)(stage, total, done, unit)
        try:
            running = True
            while running:
                time.sleep(POLL_SECONDS)
                running = proc.poll() is None  # then one last read: what the stage wrote before it ended
                records, offset = read_records(ws.metrics(stage), offset)
                if records:
                    done = records[-1]["step"]
                    recent.add(records)
                    view.update(done, records[-1], recent)
        finally:
            view.close()

    return watch
