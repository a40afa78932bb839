"""What each stage of a DistillationRun executes, built in one place for pods and for ``opd run``.

The operator puts ``StageCommand.argv`` into a container; ``opd run`` starts the same argv as a local
subprocess. Keeping one builder means the local run executes exactly what a cluster would.

Imports without torch: the operator image has none.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .contract import NO_USAGE_STATS_ENV, STAGES
from .spec import DistillationRun


@dataclass(frozen=True)
class StageCommand:
    stage: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def long_running(self) -> bool:
        return self.stage == "teacher"

    def shell(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv)


def serves_teacher(run: DistillationRun) -> bool:
    """The run needs its own teacher server: OPD is on, scoring goes over HTTP, and no URL is given."""
    spec = run.spec
    return (
        spec.distill is not None
        and spec.distill.enabled
        and spec.teacher.backend == "vllm-server"
        and spec.teacher.serving.url is None
    )


def planned_stages(run: DistillationRun) -> list[str]:
    enabled = set(run.spec.enabled_stages())
    if serves_teacher(run):
        enabled.add("teacher")
    return [s for s in STAGES if s in enabled]


def stage_command(
    run: DistillationRun,
    stage: str,
    *,
    config: str,
    workspace: str,
    teacher_url: str | None = None,
    host: str = "0.0.0.0",
    port: int | None = None,
    program: str = "opd",
) -> StageCommand:
    """The command line of one stage.

    ``config`` is the run file as the stage sees it (``/etc/opd/run.yaml`` in a pod), ``workspace`` the
    workspace directory (the PVC's mount in a pod). Batch stages always pass ``--resume``: a retried pod
    or a re-run continues from the last checkpoint and starts afresh when there is none.
    ``teacher_url`` points the OPD learner at the served teacher (the teacher Service in a cluster).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    common = ("--config", config, "--workspace", workspace)
    argv: tuple[str, ...]
    env = {"PYTHONUNBUFFERED": "1", "OPD_STAGE": stage, **NO_USAGE_STATS_ENV}
    if stage == "teacher":
        serving = run.spec.teacher.serving
        argv = (program, "serve-teacher", *common, "--host", host, "--port", str(port or serving.port))
    elif stage == "distill":
        argv = (program, "distill", *common, "--resume")
        if teacher_url:
            argv += ("--teacher-url", teacher_url)
    else:
        argv = (program, stage, *common, "--resume")
    return StageCommand(stage=stage, argv=argv, env=env)


def launcher_argv(nproc: int, *, python: str = "python") -> tuple[str, ...]:
    """The prefix that runs an ``sft`` or ``distill`` stage command as ``nproc`` data-parallel processes
    on one node (one per GPU); empty for one process.

    It is torchrun, started through ``opd_runtime.launch`` so that the stage's exit codes (2: do not
    retry) survive torchrun; ``--no-python`` lets the stage's program be a command on PATH such as
    ``opd``. Usage: ``launcher_argv(gpus) + stage_command(...).argv``.
    """
    if nproc <= 1:
        return ()
    return (python, "-m", "opd_runtime.launch", "--standalone", f"--nproc-per-node={nproc}", "--no-python")
