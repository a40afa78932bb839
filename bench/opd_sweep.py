"""Sweep OPD settings on the tiny world: which losses, learning rates, batches and estimator options move a
weak SFT student toward the teacher (docs/results/2026-12-02-opd-sweep.md).

Each configuration is one `opd distill` run (``run_distill``, local teacher) from the same start model, then
a held-out measurement: greedy accuracy on the eval set of ``examples/tiny-math.yaml`` (200 tinymath test
problems, 64 new tokens, as `opd eval` grades them) and the reverse KL to the teacher on fresh student
samples of 64 held-out prompts x 4. Rows are appended to ``--out`` (JSON lines) as they finish, so an
interrupted sweep keeps its rows and a rerun skips configurations already there.

    nice -n 10 .venv/bin/python bench/opd_sweep.py --out runs/sweep.jsonl \\
        --grid loss=importance_sampling lr=1e-4,3e-4 prompts=64 samples=4 seed=0,1 steps=60
    .venv/bin/python bench/opd_sweep.py --out runs/sweep.jsonl --table

Grid keys (each takes a comma-separated list; the sweep runs their product): loss, lr, prompts (promptsPerStep),
samples (samplesPerPrompt), clip (optimizer.maxGradNorm; `none` = no clipping), lrclip (logRatioClip;
`none` = off), warmup (warmupSteps), lora (LoRA rank; 0 = full fine-tuning), seed, steps.
The start model is the tiny world's `student` (20% greedy; weaker than the demo's SFT stage makes, ~62%)
unless ``--start DIR`` names another (e.g. a demo run's checkpoints/sft/final).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

DEFAULTS = {
    "loss": "importance_sampling",
    "lr": "1e-4",
    "prompts": "32",
    "samples": "4",
    "clip": "none",
    "lrclip": "none",
    "warmup": "0",
    "lora": "0",
    "seed": "0",
    "steps": "60",
}
HELDOUT_PROBLEMS = 200  # the demo's eval set: tinymath test, difficulty 2, seed 0
KL_PROMPTS = 64
WINDOW = 10  # steps averaged for the batch reverse KL at the start and the end of a run


def _opt(v: str) -> str:
    return "null" if v == "none" else v


def run_yaml(cfg: dict[str, str], start: Path, teacher: Path) -> str:
    lora = int(cfg["lora"])
    lora_yaml = f"lora: {{enabled: true, rank: {lora}, alpha: {2 * lora}}}" if lora else "lora: {enabled: false}"
    return f"""
apiVersion: opd.dev/v1alpha1
kind: DistillationRun
metadata: {{name: sweep}}
spec:
  student: {{model: {start}, dtype: float32}}
  teacher: {{model: {teacher}, dtype: float32, backend: local}}
  distill:
    prompts: {{name: tinymath, split: train, difficulty: 2}}
    loss: {cfg["loss"]}
    steps: {cfg["steps"]}
    promptsPerStep: {cfg["prompts"]}
    samplesPerPrompt: {cfg["samples"]}
    microBatchSize: 128
    gradientCheckpointing: false
    maxNewTokens: 64
    logRatioClip: {_opt(cfg["lrclip"])}
    seed: {cfg["seed"]}
    {lora_yaml}
    optimizer: {{learningRate: {cfg["lr"]}, warmupSteps: {cfg["warmup"]}, maxGradNorm: {_opt(cfg["clip"])}}}
    checkpointing: {{every: 1000, keep: 1}}
    metricsPort: 0
"""


def measure(model_dir: Path, teacher) -> dict:
    import torch

    from opd_runtime import modeling, tinymath
    from opd_runtime.distill.health import heldout_reverse_kl
    from opd_runtime.tiny_models import solved
    from opd_runtime.training.batches import prompt_ids

    tok = modeling.load_tokenizer(str(model_dir))
    model = modeling.load_causal_lm(str(model_dir), dtype="float32")
    problems = tinymath.generate(HELDOUT_PROBLEMS, split="test", seed=0, difficulty=2)
    right = solved(model, tok, problems, max_new_tokens=64)
    prompts = [prompt_ids(tok, tinymath.chat_messages(p.problem)) for p in problems[:KL_PROMPTS]]
    torch.manual_seed(1234)
    kl = heldout_reverse_kl(model, tok, teacher, prompts, samples_per_prompt=4)
    return {
        "accuracy": sum(right) / len(right),
        "solved": [int(r) for r in right],
        "heldout_reverse_kl": kl,
        "exact_heldout_reverse_kl": exact_reverse_kl(model, tok, teacher.model, prompts),
    }


def exact_reverse_kl(model, tok, teacher_model, prompts) -> float:
    """Reverse KL over the whole vocabulary at every position of fresh student samples (4 per prompt), nats
    per completion token: no sampled-token variance (the test's measure, tests/training/test_opd_tinymath.py)."""
    import torch

    from opd_runtime.distill.loss import dense_kl_per_token
    from opd_runtime.generation import sample
    from opd_runtime.training.batches import right_pad

    with torch.no_grad():
        torch.manual_seed(1234)
        samples = sample(model, tok, prompts, n=4, temperature=1.0, max_new_tokens=64)
        batch = right_pad([s.prompt_ids for s in samples], [s.completion_ids for s in samples], tok.pad_token_id)
        student_BTV = torch.log_softmax(model(input_ids=batch.input_ids_BT).logits.float(), -1)[:, :-1]
        teacher_BTV = torch.log_softmax(teacher_model(input_ids=batch.input_ids_BT).logits.float(), -1)[:, :-1]
        mask_BT = batch.loss_mask_BT[:, 1:]
        return float((dense_kl_per_token(student_BTV, teacher_BTV, "reverse") * mask_BT).sum() / mask_BT.sum())


def window_mean(lines: list[dict], key: str, first: bool) -> float:
    vals = [r[key] for r in (lines[:WINDOW] if first else lines[-WINDOW:])]
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per configuration")
    ap.add_argument("--grid", nargs="*", default=[], help="KEY=V1,V2 ... (keys: " + ", ".join(DEFAULTS) + ")")
    ap.add_argument("--start", type=Path, help="start model (default: the tiny world's `student`)")
    ap.add_argument("--world", type=Path, default=Path("runs/sweep-world"), help="where the tiny world is copied")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print_table(args.out)
        return

    import torch

    from opd_runtime import modeling
    from opd_runtime.distill.learner import run_distill
    from opd_runtime.distill.teacher import LocalTeacher
    from opd_runtime.spec import parse_run
    from opd_runtime.tiny_models import WorldConfig, build_cached, default_cache_dir

    torch.set_num_threads(args.threads)
    grid = dict(DEFAULTS)
    for item in args.grid:
        key, _, values = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown grid key {key!r}; known: {', '.join(DEFAULTS)}")
        grid[key] = values
    if not (args.world / "world.json").exists():  # a copy is complete once world.json is there
        build_cached(args.world, WorldConfig(), default_cache_dir(), log=print)
    start = (args.start or args.world / "student").resolve()
    teacher_dir = (args.world / "teacher").resolve()
    teacher = LocalTeacher(modeling.load_causal_lm(str(teacher_dir), dtype="float32"))
    done = {json.dumps(r["config"], sort_keys=True) for r in _rows(args.out)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not any(r["config"] == {"start": str(start)} for r in _rows(args.out)):
        with args.out.open("a") as f:
            f.write(json.dumps({"config": {"start": str(start)}, **measure(start, teacher)}) + "\n")
    keys = list(grid)
    for values in itertools.product(*(grid[k].split(",") for k in keys)):
        cfg = dict(zip(keys, values))
        cfg["start"] = str(start)
        if json.dumps(cfg, sort_keys=True) in done:
            continue
        run = parse_run(__import__("yaml").safe_load(run_yaml(cfg, start, teacher_dir)))
        with tempfile.TemporaryDirectory(prefix="opd-sweep-") as tmp:
            t0 = time.perf_counter()
            run_distill(run, Path(tmp), log=lambda *_: None)
            seconds = time.perf_counter() - t0
            lines = [json.loads(ln) for ln in (Path(tmp) / "metrics" / "distill.jsonl").read_text().splitlines()]
            row = {
                "config": cfg,
                **measure(Path(tmp) / "checkpoints" / "distill" / "final", teacher),
                "batch_reverse_kl_first": window_mean(lines, "reverse_kl", True),
                "batch_reverse_kl_last": window_mean(lines, "reverse_kl", False),
                "grad_norm_mean": sum(r["grad_norm"] for r in lines) / len(lines),
                "seconds": seconds,
            }
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(_line(row, _start_row(args.out, cfg["start"])), flush=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _start_row(path: Path, start: str) -> dict | None:
    return next((r for r in _rows(path) if r["config"] == {"start": start}), None)


def _gain(row: dict, start: dict | None) -> tuple[str, str]:
    """Paired gain in points with its standard error, and the share of the start-to-teacher gap (teacher 100%)."""
    if start is None:
        return "-", "-"
    d = [a - b for a, b in zip(row["solved"], start["solved"])]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    gap = 1.0 - start["accuracy"]
    return f"{100 * mean:+.1f} ± {100 * se:.1f}", f"{mean / gap:.0%}"


COLUMNS = "| loss | lr | prompts x samples | grad clip | logRatioClip | warmup | LoRA | seed | steps |"


def _line(row: dict, start: dict | None) -> str:
    c = row["config"]
    gain, share = _gain(row, start)
    return (
        f"| {c['loss']} | {c['lr']} | {c['prompts']} x {c['samples']} | {c['clip']} | {c['lrclip']} | "
        f"{c['warmup']} | {c['lora'] if c['lora'] != '0' else '-'} | {c['seed']} | {c['steps']} | "
        f"{100 * row['accuracy']:.1f}% | {gain} | {share} | "
        f"{_kl(start)} → {_kl(row)} | "
        f"{row['batch_reverse_kl_first']:.3f} → {row['batch_reverse_kl_last']:.3f} | "
        f"{row['grad_norm_mean']:.2f} | {row['seconds']:.0f} |"
    )


def _kl(row: dict | None) -> str:
    """Held-out reverse KL: exact (whole vocabulary) where measured, else the sampled-token estimate (~)."""
    if row is None:
        return "-"
    exact = row.get("exact_heldout_reverse_kl")
    return f"{exact:.3f}" if exact is not None else f"~{row['heldout_reverse_kl']:.3f}"


def print_table(path: Path) -> None:
    rows = _rows(path)
    for s in (r for r in rows if "start" in r["config"] and len(r["config"]) == 1):
        print(f"start {s['config']['start']}: greedy {100 * s['accuracy']:.1f}%, held-out reverse KL {_kl(s)}")
    print(
        COLUMNS + " greedy after | gain (points ± SE) | gap closed | held-out rev KL (exact; ~ sampled) | batch rev KL "
        f"(first → last {WINDOW}) | mean grad norm | s |"
    )
    print("|" + "---|" * 16)
    for r in rows:
        if len(r["config"]) > 1:
            print(_line(r, _start_row(path, r["config"]["start"])))


if __name__ == "__main__":
    main()
