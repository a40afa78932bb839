"""Child processes the tests start: a free loopback port, a polite stop, and the environment and command
of ``python -m opd_runtime``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout: float = 60) -> None:
    """SIGTERM a child the test started (a served teacher, an operator, a learner), SIGKILL it after
    ``timeout`` seconds; nothing when it is None or has already exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def opd_env() -> dict[str, str]:
    """Environment for ``python -m opd_runtime`` subprocesses: one thread, and the checkout's folder kept
    off sys.path (its operator/ folder would shadow the stdlib module; the package is installed)."""
    env = dict(os.environ)
    env["PYTHONSAFEPATH"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def opd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "opd_runtime", *args]
