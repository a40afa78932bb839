"""``python -m opd_runtime.gpu_check [--tiny] [--require-gpu] [--require-vllm] ...``: run the GPU check.

Exit codes: 0 every check ran and passed; 1 a check failed (its error is printed and the remaining
parts still run); 3 a part the command requires (``--require-gpu``, ``--require-vllm``) cannot run here,
said before anything else starts; 124 stopped by SIGTERM (``bench/gpu_check.sh``'s time limit), with the
part that was running named. A part that cannot run and is not required is reported NOT CHECKED, never
passed. ``--json`` is rewritten after every part, so a run cut short still leaves what it had done.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import FAILED, NOT_CHECKED, PASSED, Check, failed

EXIT_FAILED = 1
EXIT_MISSING = 3
EXIT_STOPPED = 124  # what `timeout` itself returns: the report says which part was running


class Stopped(BaseException):
    """SIGTERM (the time limit's ``timeout``): not an Exception, so no part's guard swallows it."""


def _stop(_signum, _frame) -> None:
    raise Stopped


PARTS = ("numerics", "size", "vllm")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd gpu-check", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes: every part in seconds, on a CPU too")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--require-gpu", action="store_true", help="exit 3 at once when no CUDA device is visible")
    p.add_argument("--require-vllm", action="store_true", help="exit 3 at once when the vLLM part cannot run")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank of the size cases (128; tiny 8)")
    p.add_argument("--gradient-checkpointing", type=int, default=1, help="1 (default) or 0, the size cases")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="GPU memory share of the vLLM engine")
    p.add_argument("--workdir", default=None, help="where the random models are written (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write every check and number here (rank 0)")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    args.lora_rank = args.lora_rank or (8 if args.tiny else 128)
    return args


def _missing(args, dev) -> list[str]:
    from .engine import unavailable

    out = []
    if args.require_gpu and dev.type != "cuda":
        out.append("--require-gpu: no CUDA device is visible to torch")
    if args.require_vllm:
        reason = unavailable(dev) if "vllm" in args.parts else "the vllm part is not among --parts"
        if reason is not None:
            out.append(f"--require-vllm: {reason}")
    return out


def _guarded(part: str, fn, say, dev) -> list[Check]:
    """A part's checks; an exception fails the part (printed in full) and the next part still runs, with
    the part's memory released."""
    t = time.perf_counter()
    try:
        checks = fn()
    except Exception as err:  # one broken part must not hide the others' results on a short GPU lease
        checks = [failed(part, part, err)]
    from .shapes import release

    release(dev)
    say(f"[{part}] {time.perf_counter() - t:.0f}s")
    for c in checks:
        say(f"  {c.status:>11}  {c.name}: {c.detail}")
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    import transformers

    from .. import modeling
    from ..training import distributed
    from . import engine, numerics, report, shapes, size

    dev = modeling.device()
    missing = _missing(args, dev)
    if missing:
        for line in missing:
            print(f"gpu_check: {line}", file=sys.stderr)
        return EXIT_MISSING
    started = time.perf_counter()
    with distributed.session():
        dev = numerics.pin_device(dev)
        checks: list[Check] = []
        try:
            group = numerics.one_process_group(dev)
        except Exception as err:  # the parts that need no process group still run; collectives then fail
            group = None
            checks.append(failed("collectives", "process group", err))
        say = print if distributed.is_main() else (lambda *_: None)
        world = distributed.world_size()
        backend = torch.distributed.get_backend() if distributed.active() else "no process group"
        say(
            f"gpu_check: {dev} x {world} ({backend}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {sys.version.split()[0]}"
            + (f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "")
        )
        work = Path(args.workdir or tempfile.gettempdir()) / f"opd-gpu-check-{'tiny' if args.tiny else 'full'}"
        work.mkdir(parents=True, exist_ok=True)
        small = shapes.TINY if args.tiny else shapes.NUMERICS
        big = shapes.TINY if args.tiny else shapes.QWEN3_1_7B
        lengths = [40, 64, 23, 90] if args.tiny else [1500, 3000, 700, 2900]
        try:
            env = report.environment(dev)
        except Exception as err:  # the report of the machine must never stop the check itself
            env = {"error": failed("environment", "environment", err).traceback}
        say("gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()))
        if "nvidia_smi" in env:
            say(env["nvidia_smi"].rstrip())

        def record(complete: bool) -> None:
            if args.json and distributed.is_main():
                report.write(args.json, dev, world, env, checks, complete=complete)

        def vllm_part() -> list[Check]:
            model_dir = work / ("size-model-tiny" if args.tiny else "size-model-qwen3-1.7b")
            if engine.unavailable(dev) is None:  # else NOT CHECKED, without writing a model first
                shapes.write_model(big, model_dir, dev)
            return engine.run(model_dir, big, args, dev, say)

        parts = []
        if "numerics" in args.parts:
            parts.append(("numerics", lambda: numerics.precision_and_packing(work, small, lengths, dev)))
            parts.append(("collectives", lambda: numerics.collectives(work, small, lengths, dev)))
        if "size" in args.parts:
            parts.append(("size", lambda: size.run(work, big, args, dev, say)))
        if "vllm" in args.parts:
            parts.append(("vllm", vllm_part))
        record(False)
        stopped: str | None = None  # the part running, while one runs
        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            for name, fn in parts:
                stopped = name
                checks += _guarded(name, fn, say, dev)
                record(False)
            stopped = None
        except Stopped:
            stopped = stopped or "the summary"  # between the last part and the handler's removal
            checks.append(
                Check(
                    stopped,
                    "stopped",
                    FAILED,
                    f"SIGTERM (GPU_CHECK_TIMEOUT) during this part, "
                    f"{time.perf_counter() - started:.0f}s after the start; the parts after it did not run",
                )
            )
        finally:
            signal.signal(signal.SIGTERM, previous)
        counts = {s: sum(c.status == s for c in checks) for s in (PASSED, FAILED, NOT_CHECKED)}
        say(
            f"gpu_check: {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[NOT_CHECKED]} not checked "
            f"in {time.perf_counter() - started:.0f}s" + (f" (stopped during {stopped})" if stopped else "")
        )
        record(stopped is None)
        if group is not None:
            with contextlib.suppress(Exception):
                group.destroy_process_group()
    if stopped:
        return EXIT_STOPPED
    return EXIT_FAILED if counts[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
