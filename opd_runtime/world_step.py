"""``opd run``'s first step when a run names ``tiny://`` models: build (or copy from the cache) the tiny
world into ``<workdir>/models`` as a step of its own, with its progress on the terminal.

Without it the first stage would build the world inside its own process as its first step (``ensure_world``)
while ``opd run`` could only show that stage at step 0 for the ~6 minutes of a first build. The build runs
as ``python -m opd_runtime.world_step MODELS_DIR``: its lines (where the cache is, what is trained, a
progress line every ``tiny_models.PROGRESS_SECONDS``) are shown prefixed with ``[world]`` and kept in
``logs/world.log``. Imports no torch: the child does the work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .spec import DistillationRun
from .workspace import MODELS_DIR, TINY_SCHEME, Workspace, ensure_tiny_world


def tiny_model_names(run: DistillationRun, stage: str | None = None) -> list[str]:
    """The ``tiny://`` names that ``stage`` resolves (models, tokenizers, distill.initFrom), or every stage
    of the run when ``stage`` is None. A stage builds the world only for names it uses: an SFT stage whose
    run scores with a tiny teacher later must not train that teacher first."""
    spec = run.spec
    student = [spec.student.model, spec.student.tokenizer]
    teacher = [spec.teacher.model, spec.teacher.tokenizer]
    d = spec.distill
    distills = d is not None and d.enabled and d.objective == "distill"
    evals_teacher = spec.eval is not None and spec.eval.enabled and "teacher" in spec.eval.targets
    per_stage = {
        "sft": student,
        "distill": student + (teacher if distills else []) + [d.init_from if d is not None else None],
        "eval": student + (teacher if evals_teacher else []),
        "teacher": teacher,
    }
    names = per_stage[stage] if stage is not None else [n for v in per_stage.values() for n in v]
    return list(dict.fromkeys(n for n in names if n is not None and n.startswith(TINY_SCHEME)))


def ensure_world(run: DistillationRun, ws: Workspace, stage: str) -> None:
    """The first step of every stage that loads models: the tiny world in the workspace when ``stage``
    names ``tiny://`` models, built (or copied from the cache) in this process the first time. Under
    ``opd run`` it is already there (``build_world`` ran before the first stage, with its progress shown)."""
    if tiny_model_names(run, stage):
        ensure_tiny_world(ws.root / MODELS_DIR)


def build_world(
    run: DistillationRun,
    workdir: Path,
    log: Callable[[str], None],
    *,
    preexec_fn: Callable[[], None] | None = None,
) -> int | None:
    """Build or copy the tiny world into ``workdir/models`` when the run needs it and it is not there yet:
    the step's exit code, or None when there was nothing to do. Its output is in ``world_log(workdir)``."""
    models = workdir / MODELS_DIR
    if not tiny_model_names(run) or (models / "world.json").exists():
        return None
    from .tiny_models import default_cache_dir

    log_path = world_log(workdir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(
        f"[world] {', '.join(sorted(set(tiny_model_names(run))))}: preparing the tiny world in {models}, "
        f"from the cache in {default_cache_dir() / 'tiny-world'} or built there first (log: {log_path})"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    t0 = time.monotonic()
    with log_path.open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opd_runtime.world_step", str(models)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # a Ctrl-C reaches opd run, which stops this child itself
            preexec_fn=preexec_fn,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                shown = line.rstrip("\n")
                if shown.strip() and "\r" not in shown:  # progress bars of libraries stay in the log
                    log(f"[world] {shown}")
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code == 0:
        log(f"[world] ready in {models} ({time.monotonic() - t0:.0f}s)")
    return code


def world_log(workdir: Path) -> Path:
    return workdir / "logs" / "world.log"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m opd_runtime.world_step MODELS_DIR", file=sys.stderr)
        return 2
    models = Path(argv[0])
    if models.exists() and not models.is_dir():
        print(f"error: {models} is not a directory; move it away so the tiny world can be put there", file=sys.stderr)
        return 2
    ensure_tiny_world(models)  # what ensure_world does in a stage, with the same lock and cache
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
