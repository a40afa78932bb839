"""The ``opd`` command: every stage of a DistillationRun, runnable locally or inside a stage pod.

Spec validation happens before torch or transformers are imported, so a bad file fails in well under a
second with a message naming the field.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .contract import BATCH_STAGES, EXIT_BAD_CONFIG, EXIT_INTERRUPTED, EXIT_OK, EXIT_RETRY, TRAINING_STAGES

if TYPE_CHECKING:
    from .stage_report import StageReport


def _load(path: str):
    from .spec import load_run

    return load_run(path)


# The batch stages report progress to the operator and leave their result or failure in the pod's
# termination message (opd_runtime.stage_report; a no-op outside a pod). Only rank 0 of a torchrun reports.
def _stage_report(command: str) -> StageReport | None:
    if command not in BATCH_STAGES or _rank() != 0:
        return None
    from .stage_report import StageReport

    return StageReport(command)


def _and_report(show, report: StageReport | None, total_steps: int | None):
    if report is None:
        return show
    report.begin(total_steps)

    def on_step(rec: dict) -> None:
        show(rec)
        report.on_step(rec)

    return on_step


def _report_done(report: StageReport | None, result: dict) -> None:
    if report is not None:
        report.done(result)


def _report_failure(report: StageReport | None, exit_code: int, error: str) -> None:
    if report is not None:
        report.failed(exit_code, error)


def _memory_plans(run, workspace: str | None):
    """Each planned stage's memory plan (model paths resolve against ``workspace``, else the current
    directory); raises SpecError with every stage that does not fit."""
    from . import memory_plan
    from .plan import planned_stages
    from .spec import SpecError

    plans = memory_plan.plan(run, planned_stages(run), root=Path(workspace) if workspace else Path.cwd())
    refusals = [m for p in plans if (m := p.refusal()) is not None]
    return plans, (SpecError("\n".join(refusals)) if refusals else None)


def cmd_validate(args) -> int:
    from . import memory_plan
    from .preflight import check_context

    run = _load(args.config)
    print(f"{args.config}: valid DistillationRun {run.metadata.name!r}; stages: {', '.join(run.spec.enabled_stages())}")
    for note in run.spec.notes():
        print(f"note: {note}")
    check_context(run)  # every eval/sampling length against its model's positions (exit 2 if one cannot fit)
    plans, refused = _memory_plans(run, args.workspace)
    for p in plans:
        print(memory_plan.summary(p))
    if refused is not None:
        raise refused
    return EXIT_OK


def cmd_plan(args) -> int:
    from . import memory_plan

    run = _load(args.config)
    plans, refused = _memory_plans(run, args.workspace)
    print("\n".join(memory_plan.report_lines(plans)))
    if refused is not None:
        raise refused
    return EXIT_OK


def cmd_tiny_models(args) -> int:
    from .tiny_models import WorldConfig, build_cached, default_cache_dir

    cfg = WorldConfig(difficulty=args.difficulty, seed=args.seed)
    if args.teacher_steps is not None:
        cfg.teacher_steps = args.teacher_steps
    if args.student_steps is not None:
        cfg.student_steps = args.student_steps
    report = build_cached(Path(args.out), cfg, None if args.no_cache else default_cache_dir())
    if args.record:
        from .tiny_models import record

        record(cfg, report)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return EXIT_OK


def cmd_distill(args) -> int:
    run = _load(args.config)
    from .distill.learner import run_distill

    def show(rec: dict) -> None:
        signal = (
            f"reverse_kl {rec['reverse_kl']:.4f}"
            if rec.get("reverse_kl") is not None
            else f"reward {rec['reward_mean']:.3f}"  # objective rl
        )
        print(
            f"step {rec['step']:>4}  {signal}  entropy {rec['entropy']:.3f}  "
            f"tokens {rec['completion_tokens']:>6}  sample {rec['sample_seconds']:.1f}s  "
            f"teacher {rec['teacher_seconds']:.1f}s  train {rec['train_seconds']:.1f}s",
            flush=True,
        )

    if args.teacher_url:
        teacher = run.spec.teacher.model_copy(
            update={
                "backend": "vllm-server",
                "serving": run.spec.teacher.serving.model_copy(update={"url": args.teacher_url}),
            }
        )
        run = run.model_copy(update={"spec": run.spec.model_copy(update={"teacher": teacher})})
    on_step = _and_report(show, args.report, run.spec.distill.steps if run.spec.distill else None)
    result = run_distill(run, Path(args.workspace), resume=args.resume, on_step=on_step)
    if _rank() == 0:
        print(json.dumps(result, indent=2))
    _report_done(args.report, result)
    return EXIT_OK


def cmd_run(args) -> int:
    from .runner import RunOptions, StageFailed, log_tail, run_all

    workdir = Path(args.workspace) if args.workspace else None
    if workdir is None:
        workdir = Path("runs") / _load(args.file).metadata.name
    opts = RunOptions(
        source=Path(args.file), workdir=workdir, resume=args.resume, teacher=args.teacher, progress=not args.no_progress
    )
    resume_cmd = f"opd run {args.file} --workspace {workdir} --resume"
    try:
        run_all(opts)
    except StageFailed as err:
        print(
            f"\nerror: {err}\n--- last lines of {err.log} ---\n{log_tail(err.log)}\n---\n"
            f"fix the cause, then continue with: {resume_cmd}",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG if err.returncode == EXIT_BAD_CONFIG else EXIT_RETRY
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM or SIGHUP (runner.Stopped): 128 + the signal
        print(
            f"\ninterrupted; the workspace keeps every finished stage and the last checkpoint. "
            f"Continue with: {resume_cmd}",
            file=sys.stderr,
        )
        return 128 + getattr(err, "signum", 2)
    return EXIT_OK


def cmd_report(args) -> int:
    from .plan import planned_stages
    from .report import Side, write_report
    from .runner import RUN_FILE, STATE_FILE, RunState
    from .spec import SpecError
    from .workspace import Workspace

    ws = Workspace(Path(args.workspace))
    run = _load(args.config or str(ws.root / RUN_FILE))
    compare = []
    for other in args.compare:
        root = Path(other)
        if not (root / RUN_FILE).exists():
            raise SpecError(f"--compare {other}: no {RUN_FILE} there; give the workspace of a finished `opd run`")
        other_ws = Workspace(root)
        other_run = _load(str(root / RUN_FILE))
        compare.append(Side(other, other_run, other_ws, RunState.load(root / STATE_FILE).stages))
    write_report(run, ws, RunState.load(ws.root / STATE_FILE).stages, planned_stages(run), compare=compare)
    return EXIT_OK


def cmd_sft(args) -> int:
    run = _load(args.config)
    from .sft.trainer import run_sft

    def show(rec: dict) -> None:
        print(
            f"step {rec['step']:>5}  loss {rec['loss']:.4f}  tokens {rec['completion_tokens']:>7}  "
            f"lr {rec['learning_rate']:.2e}  {rec['step_seconds']:.2f}s",
            flush=True,
        )

    on_step = _and_report(show, args.report, run.spec.sft.steps if run.spec.sft else None)
    result = run_sft(run, Path(args.workspace), resume=args.resume, on_step=on_step)
    if _rank() == 0:
        print(json.dumps(result, indent=2))
    _report_done(args.report, result)
    return EXIT_OK


def cmd_eval(args) -> int:
    run = _load(args.config)
    from .evaluate import run_eval

    summary = run_eval(run, Path(args.workspace), batch_size=args.batch_size, resume=args.resume)
    print(json.dumps(summary, indent=2))
    _report_done(args.report, summary)
    return EXIT_OK


def cmd_serve_teacher(args) -> int:
    run = _load(args.config)
    from .serving import serve_teacher

    return serve_teacher(
        run, Path(args.workspace), host=args.host, port=args.port, startup_timeout=args.startup_timeout
    )


def cmd_grade(args) -> int:
    from .grading.files import GradeInputError, grade_file

    try:
        report = grade_file(
            args.input, default_kind=args.kind, output=args.output, timeout_s=args.timeout, workers=args.workers
        )
    except GradeInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(f"accuracy {report['accuracy']:.3f} ({report['correct']}/{report['total']})")
    return EXIT_OK


def cmd_spec_reference(args) -> int:
    from .spec import reference

    if args.readme:
        path = Path(args.readme)
        path.write_text(reference.embed(path.read_text()))
        print(f"{path}: spec reference updated")
    else:
        print(reference.markdown(), end="")
    return EXIT_OK


def cmd_preflight(args) -> int:
    from .preflight import check_context, check_pair

    run = _load(args.config)
    s, t = run.spec.student, run.spec.teacher
    check_pair(
        s.model,
        t.model,
        student_tokenizer=s.tokenizer,
        teacher_tokenizer=t.tokenizer,
        revision_s=s.revision,
        revision_t=t.revision,
    )
    print("pre-flight: student and teacher tokenizers, special tokens and chat templates match")
    check_context(run)
    print("pre-flight: sampling and eval lengths fit the models' positions")
    return EXIT_OK


def cmd_gpu_check(args) -> int:
    """The GPU check in this process (one GPU, or the CPU with --tiny); several GPUs: one process each."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1 and not os.environ.get("WORLD_SIZE"):
        import subprocess

        launcher = [sys.executable, "-m", "opd_runtime.launch", "--standalone", f"--nproc-per-node={gpus}"]
        return subprocess.call([*launcher, "-m", "opd_runtime.gpu_check", *args.check_args])
    from .gpu_check.__main__ import main as gpu_check

    return gpu_check(args.check_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd",
        description=(
            "On-policy distillation for math reasoning. Each stage reads a DistillationRun file "
            "(--config) and a workspace directory (--workspace: a local folder, or the run's PVC in a pod)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, help_text: str, fn):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=True, help="DistillationRun YAML file")
        p.set_defaults(fn=fn)
        return p

    p = sub.add_parser(
        "run",
        help="run every stage of a DistillationRun on this machine",
        description="Validate a DistillationRun file, then run its stages (SFT, teacher "
        "serving, OPD, eval) here as subprocesses, with the same commands the operator puts "
        "in pods. Ends with a results table and WORKSPACE/report.md with plots.",
    )
    p.add_argument("file", help="DistillationRun YAML file (the one you would kubectl apply)")
    p.add_argument("--workspace", default=None, help="workspace directory (default runs/<metadata.name>)")
    # the flag's earlier name, kept hidden: the dated results pages give their commands with it
    p.add_argument("--workdir", dest="workspace", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip finished stages and continue the unfinished one from its last checkpoint",
    )
    p.add_argument(
        "--teacher",
        choices=("auto", "vllm", "local"),
        default="auto",
        help="how a `vllm-server` teacher is provided: `vllm` serves it with vLLM, `local` scores "
        "in-process; `auto` (default) uses vLLM when it is installed",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser(
        "report",
        help="rebuild report.md and plots for a workspace",
        description="Write the results table, report.md and PNG plots from a workspace's files.",
    )
    p.add_argument("--workspace", required=True, help="workspace directory")
    p.add_argument("--config", default=None, help="run file (default WORKSPACE/run.yaml)")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="WORKSPACE",
        help="another run's workspace to set beside this one (e.g. the demo's RL baseline; repeatable)",
    )
    p.set_defaults(fn=cmd_report)

    p = stage("sft", "stage 1: supervised fine-tuning of the student on teacher traces", cmd_sft)
    p.add_argument("--workspace", required=True, help="directory for checkpoints and metrics")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the workspace")
    p = stage("distill", "stage 2: on-policy distillation of the student from the teacher", cmd_distill)
    p.add_argument("--workspace", required=True, help="directory for checkpoints and metrics")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the workspace")
    p.add_argument(
        "--teacher-url",
        default=None,
        help="score with the vLLM teacher server at this base URL "
        "(overrides spec.teacher.serving.url; implies backend vllm-server)",
    )
    p = stage(
        "eval", "stage 3: accuracy of the student, SFT, distilled and teacher models on held-out problem sets", cmd_eval
    )
    p.add_argument(
        "--workspace",
        required=True,
        help="directory holding the stages' checkpoints; results go to eval/ and results/eval.json",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences generated together (overrides spec.eval.batchSize; hf default 64, vllm: the engine's)",
    )
    p.add_argument(
        "--resume", action="store_true", help="reuse results already written for the same model and settings"
    )
    p = stage("validate", "check a DistillationRun file (its memory plan included) and exit", cmd_validate)
    p.add_argument("--workspace", default=None, help="where relative model paths resolve (default: here)")
    p = stage(
        "plan",
        "print each stage's predicted peak memory per GPU (weights, gradients, optimizer, activations, vLLM, "
        "teacher); exits 2 when a stage does not fit its GPU",
        cmd_plan,
    )
    p.add_argument("--workspace", default=None, help="where relative model paths resolve (default: here)")
    p = stage(
        "serve-teacher",
        "serve the teacher model with vLLM's OpenAI-compatible server (what the learner's "
        "`vllm-server` teacher backend scores against); runs until stopped",
        cmd_serve_teacher,
    )
    p.add_argument(
        "--workspace",
        required=True,
        help="workspace directory (relative model paths and tiny:// models resolve against it)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default spec.teacher.serving.port)")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for the server to answer /health before giving up (default 1800)",
    )

    p = sub.add_parser(
        "grade",
        help="grade completions in a JSON-lines file",
        description='Grade a JSON-lines file of {"completion", "answer", optional "kind"} '
        "objects: the last \\boxed{} answer of each completion against its reference answer. "
        "Prints the accuracy.",
    )
    p.add_argument("--input", required=True, help="JSON-lines file to grade")
    p.add_argument(
        "--kind",
        choices=("aime", "math"),
        default="math",
        help="comparison for lines without a `kind`: `aime` (integers) or `math` (math-verify; default)",
    )
    p.add_argument("--output", default=None, help="write one JSON line of results per input line here")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds allowed per math-verify comparison (a comparison that takes longer is graded wrong; default 5)",
    )
    p.add_argument("--workers", type=int, default=None, help="math-verify worker processes (default: up to 4)")
    p.set_defaults(fn=cmd_grade)
    stage("preflight", "check that student and teacher tokenizers and chat templates match", cmd_preflight)

    p = sub.add_parser(
        "spec-reference",
        help="print the DistillationRun field reference (Markdown)",
        description="Print the field reference generated from the spec models' descriptions.",
    )
    p.add_argument("--readme", help="rewrite the reference between the markers in this file instead")
    p.set_defaults(fn=cmd_spec_reference)

    p = sub.add_parser(
        "tiny-models",
        help="build the offline tiny world: tokenizer, teacher and students",
        description="Build a tokenizer and tiny Qwen3-architecture teacher and students "
        "on tinymath, locally (no network).",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--difficulty", type=int, default=2, help="tinymath difficulty (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps")
    p.add_argument("--student-steps", type=int, default=None, help="weak student training steps")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="always build; by default an identical earlier build under $OPD_CACHE_DIR is reused",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="record this build's weight hashes and accuracies as the expected ones for its config, code and "
        "library versions (opd_runtime/data/tiny_worlds.json; a maintainer's step after changing the world)",
    )
    p.set_defaults(fn=cmd_tiny_models)

    p = sub.add_parser(
        "gpu-check",
        help="prove the training path on this machine's GPU: numerics, a Qwen3-1.7B at real sizes, vLLM",
        description="The GPU check (docs/guides/gpu-check.md); `opd gpu-check --help` lists its options.",
        add_help=False,
    )
    p.add_argument("check_args", nargs=argparse.REMAINDER, help="--tiny, --require-gpu, --require-vllm, --json F...")
    p.set_defaults(fn=cmd_gpu_check)
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _processes(command: str):
    """torchrun's process group for the stage, when torchrun started it; nothing for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    if command not in TRAINING_STAGES:
        from .spec import SpecError

        raise SpecError(
            f"`opd {command}` runs as a single process; start it without torchrun (only "
            f"{' and '.join(TRAINING_STAGES)} run as several processes)"
        )
    from .training.distributed import session

    return session()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-check"]:  # its own options (argparse would not pass leading options through)
        return cmd_gpu_check(argparse.Namespace(check_args=argv[1:]))
    args = build_parser().parse_args(argv)
    _stop_on_ctrl_c()
    from .preflight import TokenizerMismatch
    from .spec import SpecError

    args.report = report = _stage_report(args.command)
    try:
        with _processes(args.command):
            return args.fn(args)
    except (SpecError, TokenizerMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        _report_failure(report, EXIT_BAD_CONFIG, str(err))
        return EXIT_BAD_CONFIG
    except Exception as err:  # a traceback and exit 1 (retry); the operator gets the error line too
        _report_failure(report, EXIT_RETRY, f"{type(err).__name__}: {err}")
        raise
    except KeyboardInterrupt:
        print("interrupted; the workspace keeps the last checkpoint (re-run with --resume)", file=sys.stderr)
        _report_failure(report, EXIT_INTERRUPTED, "interrupted")
        return EXIT_INTERRUPTED


def _stop_on_ctrl_c() -> None:
    """SIGINT raises KeyboardInterrupt even when this process started with SIGINT ignored (a background
    job of a script: Python then installs no handler), so a stage always stops on it, between steps."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
