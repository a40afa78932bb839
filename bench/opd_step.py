"""Time split of OPD steps on the tiny world (sample / teacher / train), for a few batch shapes.

    make bench   (or: .venv/bin/python bench/opd_step.py)

Builds (or reuses from the cache) the tiny world, runs a few steps of `opd distill` per configuration
and prints the mean seconds per phase and completion tokens per second.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from opd_runtime.distill.learner import run_distill
from opd_runtime.spec import parse_run
from opd_runtime.tiny_models import WorldConfig, build_cached, default_cache_dir

STEPS = 4
CONFIGS = [  # (prompts per step, samples per prompt, micro-batch size, loss)
    (32, 4, 64, "importance_sampling"),
    (32, 4, 128, "importance_sampling"),
    (32, 4, 64, "full_forward_kl"),
    (128, 4, 128, "importance_sampling"),
]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "models"
        build_cached(world, WorldConfig(), default_cache_dir(), log=lambda *_: None)
        rows = []
        for prompts, samples, micro, loss in CONFIGS:
            ws = Path(tmp) / f"ws-{prompts}-{samples}-{micro}-{loss}"
            run = parse_run(
                yaml.safe_load(f"""
spec:
  student: {{model: {world}/student, dtype: float32}}
  teacher: {{model: {world}/teacher, dtype: float32, backend: local}}
  distill:
    prompts: {{name: tinymath, maxSamples: 2000}}
    loss: {loss}
    steps: {STEPS}
    promptsPerStep: {prompts}
    samplesPerPrompt: {samples}
    microBatchSize: {micro}
    maxNewTokens: 64
    optimizer: {{learningRate: 1.0e-4}}
    checkpointing: {{every: {STEPS}, keep: 1}}
    metricsPort: 0
""")
            )
            run_distill(run, ws, log=lambda *_: None)
            lines = [json.loads(ln) for ln in (ws / "metrics" / "distill.jsonl").read_text().splitlines()][1:]
            mean = {
                k: sum(r[k] for r in lines) / len(lines)
                for k in ("sample_seconds", "teacher_seconds", "train_seconds", "step_seconds", "tokens_per_second")
            }
            rows.append((f"{prompts}x{samples} mb{micro} {loss}", mean))
    print(f"{'config':<36} {'sample s':>9} {'teacher s':>10} {'train s':>8} {'step s':>7} {'tok/s':>7}")
    for name, m in rows:
        print(
            f"{name:<36} {m['sample_seconds']:>9.2f} {m['teacher_seconds']:>10.2f} {m['train_seconds']:>8.2f} "
            f"{m['step_seconds']:>7.2f} {m['tokens_per_second']:>7.0f}"
        )


if __name__ == "__main__":
    main()
