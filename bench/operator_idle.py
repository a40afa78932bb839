"""What finished DistillationRuns cost the operator: API requests per minute and its RSS, on the test
control plane (tests/support/controlplane: etcd, kube-apiserver, controllers, kwok; built once, ~15 min).

N runs (examples/tiny-math.yaml) are created in a few namespaces and their status is written as the
operator writes a finished run's (Succeeded, every stage Succeeded, observedGeneration current); then the
operator starts with its defaults (resync 60 s, all namespaces, admin credentials) and, after it settles,
``opd_operator_api_requests_total`` (its own client's requests; kopf's watch streams are not in it) is read
over a window. Target: 0 requests per minute for finished runs, whatever their number.

    .venv/bin/python bench/operator_idle.py --runs 200
    .venv/bin/python bench/operator_idle.py --runs 200 --source /path/to/another/checkout   # compare

``--source`` runs the operator (and CRD) of another checkout of this repository, e.g. an older commit
(``git worktree add /tmp/old <commit>``), against the same scenario, so the table shows both.
1,000 runs need a quiet machine: the apply and the status writes alone take minutes on two loaded cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.controlplane import ControlPlane, start  # noqa: E402

TARGET_REQUESTS_PER_MINUTE = 0.0  # finished runs: nothing to do until they are edited or deleted


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def finished_status(generation: int) -> dict:
    done = {"phase": "Succeeded", "attempts": 1, "failures": 0, "completionTime": "2026-01-01T00:00:00Z"}
    return {
        "phase": "Succeeded",
        "stage": "",
        "message": "All stages succeeded.",
        "observedGeneration": generation,
        "completionTime": "2026-01-01T00:00:00Z",
        "stages": {"sft": done, "distill": done, "eval": done, "teacher": done},
    }


def create_finished_runs(cp: ControlPlane, runs: int, namespaces: list[str]) -> None:
    base = yaml.safe_load((ROOT / "examples" / "tiny-math.yaml").read_text())
    for i in range(runs):
        ns = namespaces[i % len(namespaces)]
        doc = json.loads(json.dumps(base))
        doc["metadata"] = {"name": f"run-{i:04d}", "namespace": ns}
        created = cp.request("POST", f"/apis/opd.dev/v1alpha1/namespaces/{ns}/distillationruns", doc)
        cp.request(
            "PATCH",
            f"/apis/opd.dev/v1alpha1/namespaces/{ns}/distillationruns/run-{i:04d}/status",
            {"status": finished_status(created["metadata"]["generation"])},
            content_type="application/merge-patch+json",
        )


def requests_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("opd_operator_api_requests_total{")
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(cp: ControlPlane, source: Path, runs: int, settle: float, window: float) -> dict:
    """Requests per minute and RSS of the operator of checkout ``source`` over ``runs`` finished runs."""
    crd = source / "crds" / "distillationruns.opd.dev.yaml"
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cp.wait_established("distillationruns.opd.dev")
    namespaces = [cp.new_namespace("bench", enforce="privileged") for _ in range(min(20, max(1, runs // 10)))]
    t0 = time.monotonic()
    create_finished_runs(cp, runs, namespaces)
    created_s = time.monotonic() - t0
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp)
        (pkg / "opd_operator").symlink_to(source / "operator")
        (pkg / "opd_runtime").symlink_to(source / "opd_runtime")
        port = free_port()
        env = {**cp.env, "PYTHONPATH": str(pkg), "PYTHONSAFEPATH": "1"}
        cmd = [sys.executable, "-m", "opd_operator", "--metrics-port", str(port), "--liveness="]
        with open(pkg / "operator.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
            try:
                cp.wait("the operator's metrics", lambda: _alive_metrics(proc, port), timeout=60)
                time.sleep(settle)
                before, t1 = requests_total(port), time.monotonic()
                time.sleep(window)
                after, t2 = requests_total(port), time.monotonic()
                rss = rss_mib(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=20)
    per_minute = (after - before) * 60 / (t2 - t1)
    return {"runs": runs, "created_s": created_s, "per_minute": per_minute, "rss_mib": rss}


def _alive_metrics(proc: subprocess.Popen, port: int) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"the operator exited with {proc.returncode}")
    try:
        requests_total(port)
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="finished runs (default %(default)s)")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds after the operator starts")
    parser.add_argument("--window", type=float, default=60.0, help="seconds the requests are counted over")
    parser.add_argument("--source", type=Path, action="append", default=[], help="another checkout to compare")
    args = parser.parse_args()
    rows = []
    for source in [*args.source, ROOT]:
        cp = start()  # a fresh cluster each: no run of the previous operator left with its finalizer
        try:
            row = measure(cp, source.resolve(), args.runs, args.settle, args.window)
        finally:
            cp.stop()
        rows.append((str(source), row))
        print(f"{source}: {row}", flush=True)
    print(f"\nFinished runs on the test control plane (operator defaults: resync 60 s); load: {os.getloadavg()[0]:.1f}")
    print("| operator | runs | requests/min | per run/min | RSS MiB | target requests/min |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for source, row in rows:
        print(
            f"| {source} | {row['runs']} | {row['per_minute']:.0f} | {row['per_minute'] / row['runs']:.2f} "
            f"| {row['rss_mib']:.0f} | {TARGET_REQUESTS_PER_MINUTE:.0f} |"
        )


if __name__ == "__main__":
    main()
