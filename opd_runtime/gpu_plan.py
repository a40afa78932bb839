"""Which of this machine's GPUs each stage of ``opd run`` gets (pure: visible devices + spec -> placement).

Each stage gets the GPUs its pod would request on Kubernetes: ``spec.<stage>.resources.gpus`` for sft,
distill and eval, and for the served teacher ``spec.teacher.serving.resources.gpus`` (by default
``tensorParallelSize``). Stages that run one after another each start from the first visible GPU; the
served teacher runs beside distill, so it takes the first GPUs and the learner the next ones: the vLLM
server and the learner (with its in-process sampler) never share a device. A training stage with more than
one GPU runs as one process per GPU under ``plan.launcher_argv`` (torchrun). A stage sees only its own
GPUs (``CUDA_VISIBLE_DEVICES``); a stage that asks for none sees none.

With no GPU visible nothing changes: every stage runs as one process on the CPU, as its command says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .contract import BATCH_STAGES, TRAINING_STAGES
from .plan import StageCommand, launcher_argv, teacher_resources
from .spec import DistillationRun, SpecError

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Placement:
    """One stage's share of the machine: the device ids it sees and how many processes it runs."""

    stage: str
    devices: tuple[str, ...]
    processes: int = 1
    launcher: tuple[str, ...] = ()  # the argv prefix that starts `processes` processes (empty for one)

    @property
    def env(self) -> dict[str, str]:
        return {VISIBLE_ENV: ",".join(self.devices)}

    def describe(self) -> str:
        if not self.devices:
            return f"{self.stage}: no GPU (CPU)"
        gpus = f"GPU{'s' if len(self.devices) > 1 else ''} {','.join(self.devices)}"
        if self.stage == "teacher":
            return f"teacher: {gpus} (vLLM server, tensor parallel over them)"
        if self.processes > 1:
            return f"{self.stage}: {gpus}, {self.processes} processes (torchrun, one per GPU)"
        if self.stage == "eval":
            return f"eval: {gpus}" + (" (tensor parallel over them)" if len(self.devices) > 1 else "")
        return f"{self.stage}: {gpus}, 1 process"


@dataclass(frozen=True)
class GpuPlan:
    devices: tuple[str, ...]  # every GPU visible to `opd run`
    stages: dict[str, Placement] = field(default_factory=dict)  # empty without GPUs

    def command(self, cmd: StageCommand) -> StageCommand:
        """``cmd`` as this plan runs it: under the launcher when it has several processes, seeing its GPUs."""
        placement = self.stages.get(cmd.stage)
        if placement is None:
            return cmd
        return replace(cmd, argv=placement.launcher + cmd.argv, env={**cmd.env, **placement.env})

    def lines(self) -> list[str]:
        """The plan as ``opd run`` prints it; nothing on a machine without GPUs."""
        if not self.devices:
            return []
        out = [f"GPUs: {len(self.devices)} visible ({','.join(self.devices)})"]
        out += [f"  {p.describe()}" for p in self.stages.values()]
        if "teacher" in self.stages and "distill" in self.stages:
            busy = len(self.stages["teacher"].devices) + len(self.stages["distill"].devices)
            if busy < len(self.devices):
                out.append(
                    f"  {len(self.devices) - busy} GPU(s) idle during distill: raise spec.distill.resources.gpus "
                    "to use them"
                )
        return out


def _wanted(run: DistillationRun, stages: Sequence[str]) -> dict[str, tuple[int, str]]:
    """stage -> (GPUs it asks for, the field that says so)."""
    out: dict[str, tuple[int, str]] = {}
    for stage in stages:
        if stage == "teacher":
            field_name = (
                "spec.teacher.serving.resources.gpus"
                if run.spec.teacher.serving.resources is not None
                else "spec.teacher.serving.tensorParallelSize"
            )
            out[stage] = (teacher_resources(run).gpus, field_name)
        elif stage in BATCH_STAGES:
            out[stage] = (getattr(run.spec, stage).resources.gpus, f"spec.{stage}.resources.gpus")
    return out


def partition(
    run: DistillationRun, devices: Sequence[str], stages: Sequence[str], *, python: str = "python"
) -> GpuPlan:
    """Place ``stages`` (the planned stages ``opd run`` starts; ``teacher`` only when it serves one) on
    ``devices`` (the visible GPU ids). Raises SpecError naming the fields when the machine has too few."""
    devices = tuple(devices)
    if not devices:
        return GpuPlan(devices=())
    wanted = _wanted(run, stages)
    beside = {"teacher": "distill"} if "teacher" in wanted and "distill" in wanted else {}
    for stage, (count, field_name) in wanted.items():
        if stage in beside.values():
            continue  # counted with the teacher it runs beside
        if stage in beside:
            other = beside[stage]
            other_count, other_field = wanted[other]
            if count + other_count > len(devices):
                raise SpecError(
                    f"this machine has {len(devices)} GPU(s) ({VISIBLE_ENV}={','.join(devices)}), but the teacher "
                    f"server and the distill learner run at the same time and need {field_name} {count} + "
                    f"{other_field} {other_count} = {count + other_count}: lower {other_field} to "
                    f"{max(0, len(devices) - count)} or fewer (or {field_name}), or run on Kubernetes, where "
                    "the teacher has pods of its own"
                )
        elif count > len(devices):
            raise SpecError(
                f"{field_name} {count}: this machine has {len(devices)} GPU(s) ({VISIBLE_ENV}="
                f"{','.join(devices)}); lower {field_name} to {len(devices)} or fewer"
            )
    placed: dict[str, Placement] = {}
    for stage, (count, _field) in wanted.items():
        first = len(placed["teacher"].devices) if stage == "distill" and "teacher" in placed else 0
        mine = devices[first : first + count]
        processes = len(mine) if stage in TRAINING_STAGES and len(mine) > 1 else 1
        placed[stage] = Placement(stage, mine, processes, launcher_argv(processes, python=python))
    return GpuPlan(devices=devices, stages=placed)
