"""Metric names: the ones a Grafana dashboard's PromQL reads, and the ones opd and vLLM actually export.

Exported names are taken from the code that exports them, as Prometheus exposes them (a counter ``x`` is
scraped as ``x_total``, a histogram ``h`` as ``h_bucket``/``h_sum``/``h_count``):

- the operator: the metric objects in ``opd_operator.metrics`` (registered in its registry);
- the stages: ``opd_runtime.metrics._PromExporter``'s registry (built with its HTTP server stubbed out);
- vLLM: the ``name="vllm:..."`` literals of the metric constructors in the installed vLLM's
  ``vllm/v1/metrics/`` sources; without vLLM installed, ``VLLM_PINNED`` (read from vllm 0.32.0's
  ``vllm/v1/metrics/loggers.py``, class ``PrometheusStatLogger``), which a test checks against the
  installed source whenever there is one.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from unittest import mock

# vllm 0.32.0, vllm/v1/metrics/loggers.py (PrometheusStatLogger), as exposed.
VLLM_PINNED = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        *(
            f"vllm:{h}_{s}"
            for h in (
                "e2e_request_latency_seconds",
                "time_to_first_token_seconds",
                "inter_token_latency_seconds",
                "request_queue_time_seconds",
                "request_prompt_tokens",
                "request_generation_tokens",
            )
            for s in ("bucket", "sum", "count")
        ),
    }
)

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}


def exposed_names(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {name.removesuffix("_total") + "_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "summary":
        return {name, f"{name}_sum", f"{name}_count"}
    if kind == "info":
        return {f"{name}_info"}
    return {name}


def registry_names(registry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names |= exposed_names(family.name, family.type)
    return names


def operator_metric_names() -> set[str]:
    from opd_operator import metrics

    return registry_names(metrics.REGISTRY)


def stage_metric_names() -> set[str]:
    from opd_runtime.metrics import _PromExporter

    with mock.patch("prometheus_client.start_http_server"):
        exporter = _PromExporter(0, "distill", 10)
    return registry_names(exporter.registry)


def vllm_metrics_dir() -> Path | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics"
    return path if path.is_dir() else None


def vllm_source_metric_names(metrics_dir: Path) -> set[str]:
    """``name="vllm:..."`` of every Gauge/Counter/Histogram constructor call in vLLM's metrics sources."""
    kinds = {"gauge": "gauge", "counter": "counter", "histogram": "histogram"}
    names: set[str] = set()
    for source in sorted(metrics_dir.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            callee = (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")).lower()
            kind = next((k for word, k in kinds.items() if word in callee), None)
            name = next(
                (
                    kw.value.value
                    for kw in node.keywords
                    if kw.arg == "name" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)
                ),
                None,
            )
            if kind and name and name.startswith("vllm:"):
                names |= exposed_names(name, kind)
    return names


def vllm_metric_names() -> set[str]:
    metrics_dir = vllm_metrics_dir()
    return vllm_source_metric_names(metrics_dir) if metrics_dir else set(VLLM_PINNED)


def exported_metric_names() -> set[str]:
    return operator_metric_names() | stage_metric_names() | vllm_metric_names()


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers outside label matchers, ranges, grouping
    clauses and function calls)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_metric_names(dashboard: dict) -> set[str]:
    names: set[str] = set()

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            names |= promql_metric_names(target.get("expr", ""))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.match(r"\s*label_values\((.*),\s*[\w]+\s*\)\s*$", query)
        if m:
            names |= promql_metric_names(m.group(1))
        elif var.get("type") == "query":
            names |= promql_metric_names(query)
    return names
