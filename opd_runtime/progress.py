"""Progress of a running stage, read from the files it writes (metrics/<stage>.jsonl, eval/).

``opd run`` shows a bar per stage; the stage process itself only appends its step records, so the same
records feed the bar, the report and the operator's view of a pod.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .spec import DistillationRun
from .workspace import Workspace

POLL_SECONDS = 0.5
PLAIN_LINE_SECONDS = 30.0  # without a terminal, one progress line this often


def read_records(path: Path, start: int = 0) -> tuple[list[dict], int]:
    """Complete JSON lines from byte ``start`` on, and the offset after the last complete line."""
    if not path.exists():
        return [], start
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, start + end


def postfix(stage: str, rec: dict) -> dict:
    """What the bar shows next to the step count."""
    shown = {}
    if stage == "distill":
        shown["rev_kl"] = f"{rec['reverse_kl']:.3f}"
    elif "loss" in rec:
        shown["loss"] = f"{rec['loss']:.3f}"
    if rec.get("tokens_per_second"):
        shown["tok/s"] = f"{rec['tokens_per_second']:.0f}"
    return shown


def _total(stage: str, run: DistillationRun) -> int | None:
    spec = run.spec
    if stage in ("sft", "distill"):
        return getattr(spec, stage).steps
    if stage == "eval":
        return len(spec.eval.datasets) * len(spec.eval.targets)
    return None


def watcher_for(stage: str, run: DistillationRun, ws: Workspace, *,
                enabled: bool = True) -> Callable[[subprocess.Popen], None]:
    """A function that follows ``stage``'s progress until its process exits."""
    total = _total(stage, run)

    def watch(proc: subprocess.Popen) -> None:
        if not enabled:
            return
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        started = time.time()
        offset, done, last_plain, latest = 0, 0, time.monotonic(), None
        records, offset = read_records(ws.metrics(stage), 0)
        done = initial = records[-1]["step"] if records and stage != "eval" else 0
        unit = "problem set" if stage == "eval" else "step"
        bar = tqdm(total=total, initial=done, desc=stage, unit=unit, disable=not tty, dynamic_ncols=True)
        try:
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
                if stage == "eval":
                    written = [p for p in ws.root.glob("eval/*/*.json") if p.stat().st_mtime >= started]
                    new = len(written) - done
                else:
                    records, offset = read_records(ws.metrics(stage), offset)
                    new = records[-1]["step"] - done if records else 0
                    latest = records[-1] if records else latest
                if new > 0:
                    done += new
                    bar.update(new)
                    if latest:
                        bar.set_postfix(postfix(stage, latest), refresh=False)
                if not tty and time.monotonic() - last_plain >= PLAIN_LINE_SECONDS:
                    last_plain = time.monotonic()
                    extra = "  ".join(f"{k} {v}" for k, v in (postfix(stage, latest) if latest else {}).items())
                    elapsed = time.time() - started
                    rate = (done - initial) / elapsed if elapsed > 0 else 0
                    eta = f"  eta {(total - done) / rate:.0f}s" if rate and total else ""
                    print(f"[{stage}] {done}/{total if total is not None else '?'} {unit}s  {extra}{eta}",
                          flush=True)
        finally:
            bar.close()

    return watch
