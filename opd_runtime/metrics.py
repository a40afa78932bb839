"""Per-step metrics: a JSON line per step in the workspace, and the same values for Prometheus.

The JSONL file is the durable record (the operator and ``opd run`` read it); the Prometheus gauges
are for live dashboards while a stage runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Prometheus names of the per-step values; the keys are the metrics.jsonl field names.
GAUGES = {
    "reverse_kl": ("opd_reverse_kl", "Per-token reverse KL(student || teacher) on the step's samples"),
    "entropy": ("opd_entropy", "Mean per-token entropy of the student on its samples (nats)"),
    "completion_tokens": ("opd_completion_tokens", "Completion tokens sampled in the last step"),
    "mean_completion_length": ("opd_mean_completion_length", "Mean completion length in the last step (tokens)"),
    "learning_rate": ("opd_learning_rate", "Learning rate of the last optimizer step"),
    "grad_norm": ("opd_grad_norm", "Gradient norm before clipping"),
    "importance_ratio_mean": (
        "opd_importance_ratio_mean",
        "Mean over the last step's completion tokens of p_trainer / p_sampler (1 when the sampler matches)",
    ),
    "importance_ratio_max": ("opd_importance_ratio_max", "Largest p_trainer / p_sampler in the last step"),
    "reward_mean": ("opd_reward_mean", "Objective rl: mean reward of the last step's samples"),
    "zero_variance_group_fraction": (
        "opd_zero_variance_group_fraction",
        "Objective rl: share of the last step's prompts whose samples all earned the same reward",
    ),
    "step": ("opd_step", "Last finished OPD step"),
}
PHASES = ("sample", "teacher", "train")


class MetricsSink:
    def __init__(self, path: Path, *, port: int = 0, stage: str = "distill", total_steps: int | None = None):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prom = None
        if port:
            self._prom = _PromExporter(port, stage, total_steps)

    def begin(self, resumed_step: int) -> None:
        """Start a fresh file, or keep a resumed run's lines up to its checkpoint."""
        if resumed_step > 0:
            self.truncate_after(resumed_step)
        elif self.path.exists():
            self.path.unlink()

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (logged by a run that died before checkpointing them)."""
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._prom is not None:
            self._prom.update(record)


class NullSink:
    """The sink of a process that writes nothing: ranks other than 0 of a multi-process stage."""

    def begin(self, resumed_step: int) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass


class _PromExporter:
    def __init__(self, port: int, stage: str, total_steps: int | None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.gauges = {k: Gauge(name, doc, registry=self.registry) for k, (name, doc) in GAUGES.items()}
        self.tokens = Counter("opd_tokens_sampled", "Completion tokens sampled", registry=self.registry)
        self.phase = Gauge(
            "opd_step_phase_seconds", "Seconds of the last step spent per phase", ["phase"], registry=self.registry
        )
        self.step_seconds = Gauge("opd_step_seconds", "Wall-clock seconds of the last step", registry=self.registry)
        total = Gauge("opd_total_steps", "Steps this stage will run", registry=self.registry)
        if total_steps:
            total.set(total_steps)
        start_http_server(port, registry=self.registry)

    def update(self, record: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            if record.get(key) is not None:
                gauge.set(record[key])
        self.tokens.inc(record.get("completion_tokens", 0))
        for phase in PHASES:
            self.phase.labels(phase).set(record.get(f"{phase}_seconds", 0.0))
        self.step_seconds.set(record.get("step_seconds", 0.0))
