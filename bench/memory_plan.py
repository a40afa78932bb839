"""The memory plan's prediction beside bench/memory.py's measurement, case by case.

    .venv/bin/python bench/memory.py --cases sft-new-16384,sft-new-4096,opd-is-new-4096,... --results R.jsonl
    .venv/bin/python bench/memory_plan.py R.jsonl

The plan (``opd_runtime.memory_plan.training_phases``) is given each case as ``TrainingCase(device="cpu")``:
bench/memory.py's 2-layer model at Qwen3-1.7B's widths, fp32, full fine-tuning, gradient checkpointing, the
case's tokens per micro-batch and longest trace. On a CPU the measurement is resident memory (RSS, sampled
every 2 ms), which also holds the interpreter and its libraries and keeps freed blocks in glibc's arenas;
on a GPU it would be ``torch.cuda.max_memory_allocated`` plus the CUDA context. So the comparison adds
the resident size of a process that has imported what a case imports (measured here, ``--overhead``) to
the prediction, and sets side by side: the resident state before the step (weights, gradients, AdamW
moments, the teacher), the step's peak above it, and the whole peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opd_runtime.memory_plan import ModelShape, Phase, TrainingCase, training_phases  # noqa: E402
from opd_runtime.spec.gpus import GIB  # noqa: E402

# bench/memory.py's SHAPE: Qwen3-1.7B's widths, 2 decoder layers
BENCH = ModelShape("bench 2-layer Qwen3-1.7B", 2048, 2, 16, 8, 128, 6144, 151_936, True)
RESIDENT = ("weights", "AdamW moments", "gradients", "local teacher weights")
TOLERANCE = 0.15  # the target: prediction within 15% of the measured peak


def case_of(kind: str, tokens: int) -> TrainingCase:
    """bench/memory.py's case as the plan sees it: sft packs 4 traces into one row; opd right-pads 8
    samples of tokens/8 (rows x longest = tokens) with a local teacher of the same shape."""
    if kind == "sft":
        return TrainingCase(BENCH, tokens=tokens, longest=tokens // 4, dtype="float32", device="cpu")
    return TrainingCase(
        BENCH,
        tokens=tokens,
        longest=tokens // 8,
        dtype="float32",
        device="cpu",
        local_teacher=BENCH,
        teacher_in_loss=kind == "opd-kl",
    )


def overhead_bytes() -> int:
    """Resident size of a fresh process that imported torch, transformers' Qwen3 and the stages' modules."""
    code = (
        "import torch, transformers\n"
        "from transformers import Qwen3Config, Qwen3ForCausalLM\n"
        "import opd_runtime.distill.learner, opd_runtime.sft.trainer\n"
        "import os\n"
        "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def rows(results: list[dict], overhead: int) -> list[dict]:
    out = []
    for r in results:
        if r.get("status") != "ok" or r["path"] != "new" or r["case"] not in ("sft", "opd-is", "opd-kl"):
            continue
        phases = training_phases(case_of(r["case"], r["tokens"]))
        peak: Phase = max(phases, key=lambda p: p.bytes)
        resident = sum(p.bytes for p in phases[0].parts if p.name in RESIDENT)
        out.append(
            {
                "case": f"{r['case']} {r['tokens']}",
                "resident": (overhead + resident, r["base"]),
                "above": (peak.bytes - resident, r["peak"] - r["base"]),
                "peak": (overhead + peak.bytes, r["peak"]),
                "phase": peak.name,
            }
        )
    return out


def table(out: list[dict], overhead: int) -> str:
    lines = [
        f"process overhead (interpreter + libraries, measured): {overhead / GIB:.2f} GiB",
        "| case | before the step: plan / measured (GiB) | step above it: plan / measured (GiB) "
        "| peak: plan / measured (GiB) | peak error | peak phase (plan) |",
        "|---|---|---|---|---|---|",
    ]
    for r in out:
        err = r["peak"][0] / r["peak"][1] - 1
        cells = [f"{a / GIB:.2f} / {b / GIB:.2f}" for a, b in (r["resident"], r["above"], r["peak"])]
        ok = "" if abs(err) <= TOLERANCE else " (outside 15%)"
        lines.append(f"| {r['case']} | {' | '.join(cells)} | {err:+.1%}{ok} | {r['phase']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a bench/memory.py --results file")
    ap.add_argument("--overhead", type=float, default=None, help="process overhead in GiB (default: measure it)")
    args = ap.parse_args()
    results = [json.loads(ln) for ln in Path(args.results).read_text().splitlines() if ln.strip()]
    overhead = int(args.overhead * GIB) if args.overhead is not None else overhead_bytes()
    print(table(rows(results, overhead), overhead))


if __name__ == "__main__":
    main()
