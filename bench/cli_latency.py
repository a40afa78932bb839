"""How long a bad DistillationRun takes to be rejected (target: well under 2 s, before torch loads).

make bench   (or: .venv/bin/python bench/cli_latency.py)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TARGET_SECONDS = 2.0
BASE = {
    "apiVersion": "opd.dev/v1alpha1",
    "kind": "DistillationRun",
    "metadata": {"name": "bench"},
    "spec": {"student": {"model": "s"}, "teacher": {"model": "t"}, "distill": {"prompts": {"name": "tinymath"}}},
}


def case(mutate) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    mutate(doc["spec"])
    return doc


CASES = {
    "typo in a field": case(lambda s: s["distill"].update(learningRat=1e-4)),
    "negative learning rate": case(lambda s: s["distill"].update(optimizer={"learningRate": -1})),
    "missing teacher": case(lambda s: s.pop("teacher")),
}


COMMANDS = {
    "opd run": lambda path, ws: ["run", str(path), "--workspace", str(ws)],
    "opd distill": lambda path, ws: ["distill", "--config", str(path), "--workspace", str(ws)],
}


def main(repeats: int = 5) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, doc in CASES.items():
            path = Path(tmp) / "run.yaml"
            path.write_text(yaml.safe_dump(doc))
            for command, argv in COMMANDS.items():
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    proc = subprocess.run(
                        [sys.executable, "-m", "opd_runtime", *argv(path, Path(tmp) / "ws")],
                        capture_output=True,
                        text=True,
                    )
                    times.append(time.perf_counter() - t0)
                    assert proc.returncode == 2, proc.stderr
                rows.append((name, command, statistics.median(times), max(times)))
    print(f"{'bad spec':<26} {'command':<12} {'median s':>9} {'max s':>7} {'target s':>9}")
    for name, command, med, worst in rows:
        print(f"{name:<26} {command:<12} {med:>9.2f} {worst:>7.2f} {TARGET_SECONDS:>9.1f}")


if __name__ == "__main__":
    main()
