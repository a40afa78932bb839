"""What each stage of a DistillationRun executes, built in one place for pods and for ``opd run``.

The operator puts ``StageCommand.argv`` into a container; ``opd run`` starts the same argv as a local
subprocess. Keeping one builder means the local run executes exactly what a cluster would.

Imports without torch: the operator image has none.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .contract import NO_USAGE_STATS_ENV, STAGES
from .spec import DistillationRun, ResourcesSpec


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
    """The run needs its own teacher server: OPD is on with a teacher (objective `distill`; `rl` grades
    answers instead), scoring goes over HTTP, and no URL is given."""
    spec = run.spec
    return (
        spec.distill is not None
        and spec.distill.enabled
        and spec.distill.objective == "distill"
        and spec.teacher.backend == "vllm-server"
        and spec.teacher.serving.url is None
    )


def teacher_resources(run: DistillationRun) -> ResourcesSpec:
    """What one teacher replica gets: ``serving.resources``, by default ``tensorParallelSize`` GPUs."""
    serving = run.spec.teacher.serving
    return serving.resources or ResourcesSpec.model_validate({"gpus": serving.tensor_parallel_size})


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


# torchrun's rendezvous port on pod 0 of a multi-node stage (the TCPStore every node's agent joins).
RENDEZVOUS_PORT = 29500
# Set by the Job controller in every pod of an Indexed Job: the pod's index, 0..completions-1. Kubernetes
# expands ``$(NAME)`` in a container's command from its environment, so the pod's node rank is its index.
NODE_RANK = "$(JOB_COMPLETION_INDEX)"


def processes_per_pod(gpus: int) -> int:
    """Training processes in one pod: one per GPU, one without a GPU."""
    return max(1, gpus)


def launcher_argv(
    nproc: int,
    *,
    nodes: int = 1,
    master_addr: str | None = None,
    master_port: int = RENDEZVOUS_PORT,
    node_rank: str = NODE_RANK,
    python: str = "python3",
) -> tuple[str, ...]:
    """The prefix that runs an ``sft`` or ``distill`` stage command as ``nproc`` data-parallel processes
    per node on ``nodes`` nodes; empty for one process on one node.

    It is torchrun, started through ``opd_runtime.launch`` so that the stage's exit codes (2: do not
    retry) survive torchrun; ``--no-python`` lets the stage's program be a command on PATH such as
    ``opd``. One node: ``--standalone`` (a local rendezvous). Several: a static rendezvous on
    ``master_addr:master_port`` (pod 0's stable DNS name in a cluster), node rank ``node_rank``, so pod 0
    holds global ranks 0..nproc-1 and rank 0 (the one that writes results) is always on pod 0.
    Usage: ``launcher_argv(gpus, nodes=...) + stage_command(...).argv``.
    """
    if nodes == 1 and nproc <= 1:
        return ()
    if nproc < 1 or nodes < 1:
        raise ValueError(f"need at least one process and one node, got nproc={nproc}, nodes={nodes}")
    launch = (python, "-m", "opd_runtime.launch")
    if nodes == 1:
        return (*launch, "--standalone", f"--nproc-per-node={nproc}", "--no-python")
    if not master_addr:
        raise ValueError("a multi-node launch needs master_addr, the host of node rank 0")
    return (
        *launch,
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        "--no-python",
    )
