"""The operator's Prometheus metrics (served on :8000 by prometheus_client).

- ``opd_operator_runs{phase}``: runs this operator reconciles, by status.phase;
- ``opd_operator_stage_duration_seconds{stage,outcome}``: first start to success/final failure of a stage;
- ``opd_operator_reconciles_total`` and ``opd_operator_reconcile_errors_total``;
- ``opd_operator_run_eval_score{namespace,run}``: a run's headline eval pass@1 (status.evalScore), kept
  after the eval pod is gone (the Grafana dashboard's eval panel reads it);
- ``opd_operator_api_requests_total{verb,resource}``: requests this process made to the API server
  (its own client's, not kopf's watch streams): what an idle run costs, and proof that a standby
  replica writes nothing;
- ``opd_operator_leader``: 1 while this process holds the leader-election Lease (or runs without
  election), 0 while it stands by.
"""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from opd_runtime.contract import BATCH_STAGES
from opd_runtime.spec.status import Phase

PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]
OUTCOMES = ("succeeded", "failed")  # reconcile.StageOutcome.outcome
# Stages last minutes (tiny runs) to days (SFT on 400k traces).
DURATION_BUCKETS = (
    30,
    60,
    300,
    900,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    8 * 3600,
    16 * 3600,
    24 * 3600,
    48 * 3600,
    96 * 3600,
    float("inf"),
)

REGISTRY = CollectorRegistry()
RUNS = Gauge(
    "opd_operator_runs", "DistillationRuns reconciled by this operator, by phase", ["phase"], registry=REGISTRY
)
STAGE_DURATION = Histogram(
    "opd_operator_stage_duration_seconds",
    "Seconds from a stage's first start to its success or final failure",
    ["stage", "outcome"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
RECONCILES = Counter("opd_operator_reconciles", "Reconciles of DistillationRuns", registry=REGISTRY)
EVAL_SCORE = Gauge(
    "opd_operator_run_eval_score",
    "Headline eval pass@1 of a run (status.evalScore)",
    ["namespace", "run"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter("opd_operator_reconcile_errors", "Reconciles that raised an error", registry=REGISTRY)
API_REQUESTS = Counter(
    "opd_operator_api_requests",
    "Requests to the Kubernetes API server by the operator's own client, by HTTP verb and resource",
    ["verb", "resource"],
    registry=REGISTRY,
)
LEADER = Gauge("opd_operator_leader", "1 while this process leads (holds the Lease), else 0", registry=REGISTRY)
_serving: set[int] = set()

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def _publish() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, n in counts.items():
        RUNS.labels(phase=phase).set(n)


def set_phase(namespace: str, name: str, phase: str | None) -> None:
    with _lock:
        if phase:
            _phases[(namespace, name)] = phase
        _publish()


def forget(namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((namespace, name), None)
        _publish()
        with contextlib.suppress(KeyError):
            EVAL_SCORE.remove(namespace, name)


def set_eval_score(namespace: str, name: str, score: float | None) -> None:
    if score is not None:
        EVAL_SCORE.labels(namespace=namespace, run=name).set(score)


def observe_stage(stage: str, outcome: str, seconds: float) -> None:
    STAGE_DURATION.labels(stage=stage, outcome=outcome).observe(seconds)


def serve(port: int) -> None:
    """Serve /metrics on ``port`` (once per process: a standby starts it before it leads)."""
    with _lock:
        _publish()
        if port in _serving:
            return
        _serving.add(port)
        # Every (stage, outcome) series exists from the start at 0: a histogram series born at its first
        # observation already holds it, so rate()/increase() (the dashboard's stage-duration panels) see no
        # increase and show NaN for each stage's first completion after the operator started.
        for stage in BATCH_STAGES:
            for outcome in OUTCOMES:
                STAGE_DURATION.labels(stage=stage, outcome=outcome)
    start_http_server(port, registry=REGISTRY)
