"""The Grafana dashboard (charts/opd-operator/dashboards/opd.json) against a real Prometheus and real data.

One scenario feeds a real Prometheus (Debian's package, tests/support/prometheus_server.py):

- the chart is installed with its ServiceMonitor and PodMonitor (interval 1 s) on the test control plane;
  Prometheus gets the scrape jobs prometheus-operator generates from those two monitors as the API server
  stores them, with Kubernetes discovery against the same API server (Debian's Prometheus is built without
  it: tests/support/prometheus_server.py serves the same targets and labels over HTTP discovery). The pods
  are kwok's, so each target's address is rewritten to 127.0.0.1 (same port): their processes run here, not in the pods;
- the operator (``python -m opd_operator``, the chart's ServiceAccount token, ``--metrics-port``) drives a
  DistillationRun teacher -> distill -> eval;
- while the distill pod is Running, its stage command (``opd_runtime.plan.stage_command``, ``metricsPort``
  set) runs here for real: the learner serves ``opd_*`` on its metrics port and scores with the teacher
  served by real vLLM (``opd serve-teacher``, the teacher pod's command), which serves ``vllm:*``;
  the distill pod ends with the stage's own exit code and termination message; the eval pod ends with a
  given result (no eval runs, as in test_chart_k8s).

Then every ``expr`` of the dashboard, with its template variables replaced by values Prometheus lists for
them, is evaluated with ``/api/v1/query``: learner and vLLM panels at a moment while the learner ran,
operator panels after the run succeeded. Each must answer without error, with at least one series holding
a number (not NaN), and every label its legend names.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from support import monitoring_crds
from support.chart import CHART, install, uninstall
from support.controlplane import ControlPlane
from support.metric_names import promql_metric_names
from support.processes import free_port, opd_env, stop_process
from support.prometheus_server import KubernetesDiscovery, Prometheus, ensure_prometheus, monitor_scrape_configs

pytestmark = pytest.mark.vllm  # k8s: from the control_plane fixture (tests/conftest.py)

DASHBOARD = CHART / "dashboards" / "opd.json"
RUN = "dash"
SCRAPE_INTERVAL_S = 1
# Grafana's $__rate_interval: max(4 x the data source's scrape interval, the query step + that interval);
# with Grafana's default scrape interval (15 s) it is at least 1 m. A window of seconds would leave the
# latency quantile NaN whenever one OPD step (one teacher request) takes longer, as on a loaded machine.
RATE_INTERVAL = "1m"
DISTILL_STEPS = 20  # ~1 s each: the learner has to stay up until Prometheus holds a few scrapes of it
SCENARIO_TIMEOUT_S = 420  # a vLLM engine takes ~25 s to start on 2 idle cores, minutes on a loaded one
EVAL_RESULT = {"stage": "eval", "eval_score": 0.375, "scores": {"distill/tinymath": 0.375}}


def run_doc(metrics_port: int, teacher_port: int) -> dict:
    """Served teacher -> OPD -> eval on the tiny world, small steps (the learner only has to run)."""
    return {
        "apiVersion": "opd.dev/v1alpha1",
        "kind": "DistillationRun",
        "metadata": {"name": RUN},
        "spec": {
            "student": {"model": "tiny://student", "dtype": "float32"},
            "teacher": {
                "model": "tiny://teacher",
                "dtype": "float32",
                "backend": "vllm-server",
                "serving": {"port": teacher_port, "maxModelLen": 512, "gpuMemoryUtilization": 0.1},
            },
            "image": "registry.invalid/opd-runtime-cpu:test",
            "workspace": {"size": "1Gi"},
            "distill": {
                "prompts": {"name": "tinymath", "split": "train", "difficulty": 2},
                "loss": "importance_sampling",
                "steps": DISTILL_STEPS,
                "promptsPerStep": 4,
                "samplesPerPrompt": 2,
                "microBatchSize": 8,
                "maxNewTokens": 32,
                "temperature": 1.0,
                "seed": 0,
                "optimizer": {"learningRate": 1.0e-4, "warmupSteps": 2},
                "checkpointing": {"every": 1000, "keep": 1},
                "metricsPort": metrics_port,
                "resources": {"gpus": 0},
            },
            "eval": {
                "datasets": [{"name": "tinymath", "split": "test", "difficulty": 2, "maxSamples": 8, "kind": "aime"}],
                "targets": ["distill"],
                "maxNewTokens": 32,
                "resources": {"gpus": 0},
            },
        },
    }


@dataclass
class Scraped:
    prom: Prometheus
    namespace: str
    live_at: float  # a moment while the learner and the served teacher were scraped
    end_at: float  # after the run succeeded and Prometheus scraped the operator's eval score
    range_s: int  # Grafana's $__range: the scenario from Prometheus' start


def stage_argv(run, stage: str, workdir: Path, **kw) -> tuple[list[str], dict[str, str]]:
    """The stage's pod command (plan.stage_command), run with this interpreter."""
    from opd_runtime.plan import stage_command

    cmd = stage_command(run, stage, config=str(workdir / "run.yaml"), workspace=str(workdir), **kw)
    env = {**opd_env(), **cmd.env}
    return [sys.executable, "-m", "opd_runtime", *cmd.argv[1:]], env


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def url_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def scraped(control_plane: ControlPlane, tmp_path_factory) -> Iterator[Scraped]:
    from opd_runtime.spec import DistillationRun
    from opd_runtime.workspace import Workspace
    from opd_runtime.world_step import ensure_world

    cp = control_plane
    try:
        binary = ensure_prometheus()
    except Exception as err:  # a clear failure, never a skip
        pytest.fail(f"no Prometheus to test the dashboard against: {err}", pytrace=False)
    tmp = tmp_path_factory.mktemp("dashboard")
    for path in monitoring_crds.ensure():
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cp.wait_established(*(f"{kind}.monitoring.coreos.com" for kind in monitoring_crds.KINDS))

    ns = cp.new_namespace("opd-dash")
    operator_port, learner_port, teacher_port, prom_port = (free_port() for _ in range(4))
    doc = run_doc(learner_port, teacher_port)
    run = DistillationRun.model_validate(doc)
    (tmp / "run.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    ensure_world(run, Workspace(tmp), "distill")  # the tiny world, copied from the cache (built there once)

    with ExitStack() as stack:
        # The teacher's vLLM engine (the slowest part: ~25 s on 2 idle cores) starts first, meanwhile the rest.
        argv, teacher_env = stage_argv(run, "teacher", tmp, host="127.0.0.1")
        teacher_log = tmp / "teacher.log"
        with open(teacher_log, "w") as out:
            teacher = subprocess.Popen(argv, env=teacher_env, stdout=out, stderr=subprocess.STDOUT)
        stack.callback(stop_process, teacher)
        install(
            cp,
            RUN,
            ns,
            # One operator process runs here: one replica, so the ServiceMonitor finds one target.
            *("--set", "replicas=1", "--set", "watch.allNamespaces=false", "--set", f"metrics.port={operator_port}"),
            *("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"),
            *(
                f"--set=metrics.{m}.{k}={SCRAPE_INTERVAL_S}s"
                for m in ("serviceMonitor", "podMonitor")
                for k in ("interval", "scrapeTimeout")
            ),
        )
        stack.callback(uninstall, cp, RUN, ns)
        monitors = json.loads(cp.kubectl("get", "servicemonitors,podmonitors", "-n", ns, "-o", "json").stdout)["items"]
        assert {m["kind"] for m in monitors} == {"ServiceMonitor", "PodMonitor"}
        discovery = KubernetesDiscovery(cp.get)
        stack.callback(discovery.close)
        # The pods are kwok's: their processes are the ones started here, on the same ports.
        here = [
            {
                "source_labels": ["__address__"],
                "regex": r".*:(\d+)",
                "target_label": "__address__",
                "replacement": "127.0.0.1:${1}",
            }
        ]
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "scrape_configs": [job for m in monitors for job in monitor_scrape_configs(m, discovery, here)],
        }
        prom = Prometheus(binary, config, tmp / "prometheus", prom_port)
        stack.callback(prom.stop)
        prom.start()
        prom_started = time.time()

        env = {**os.environ, "PYTHONSAFEPATH": "1", "OPD_RESYNC_SECONDS": "1"}
        env["KUBECONFIG"] = str(cp.serviceaccount_kubeconfig(ns, f"{RUN}-opd-operator"))
        operator_log = tmp / "operator.log"
        with open(operator_log, "w") as out:
            operator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "opd_operator",
                    "--namespace",
                    ns,
                    "--liveness=",
                    f"--metrics-port={operator_port}",
                ],
                env=env,
                cwd=tmp,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        stack.callback(stop_process, operator)
        cp.apply(doc, namespace=ns)

        def logs() -> str:
            return "\n".join(
                f"--- {p.name}\n{log_tail(p)}" for p in (operator_log, teacher_log, tmp / "distill.log", prom.log)
            )

        learner: subprocess.Popen | None = None
        termination = tmp / "distill.termination"
        ended: set[str] = set()
        live_at = end_at = None
        learner_started = 0.0
        deadline = time.monotonic() + SCENARIO_TIMEOUT_S
        while end_at is None:
            assert time.monotonic() < deadline, f"the scenario did not finish in {SCENARIO_TIMEOUT_S} s\n{logs()}"
            assert operator.poll() is None and teacher.poll() is None, f"a process exited\n{logs()}"
            # Live: three steps done, and the teacher's target scraped for a few seconds, a second ago (a
            # moment already scraped, so the learner's series cannot turn stale after it).
            moment = time.time() - SCRAPE_INTERVAL_S
            if (
                learner is not None
                and live_at is None
                and prom.query(f'opd_step{{namespace="{ns}"}} >= 3', at=moment)
                and prom.query(f'count_over_time(vllm:prompt_tokens_total{{namespace="{ns}"}}[10s]) >= 5', at=moment)
            ):
                live_at = moment
            for pod in cp.pods(ns, "app.kubernetes.io/name=opd"):
                stage, name = pod["metadata"]["labels"].get("opd.dev/stage"), pod["metadata"]["name"]
                if name in ended or pod["status"].get("phase") != "Running":
                    continue
                if stage == "distill" and learner is None and url_ok(f"http://127.0.0.1:{teacher_port}/v1/models"):
                    argv, learner_env = stage_argv(run, "distill", tmp, teacher_url=f"http://127.0.0.1:{teacher_port}")
                    learner_env["OPD_TERMINATION_LOG"] = str(termination)
                    with open(tmp / "distill.log", "w") as out:
                        learner = subprocess.Popen(argv, env=learner_env, stdout=out, stderr=subprocess.STDOUT)
                    learner_started = time.time()
                    stack.callback(stop_process, learner)
                elif stage == "distill" and learner is not None and learner.poll() is not None:
                    assert live_at is not None, f"the learner ended before Prometheus had its metrics\n{logs()}"
                    message = termination.read_text() if termination.exists() else ""
                    cp.set_pod_exit(ns, name, learner.returncode, message)
                    ended.add(name)
                elif stage == "eval":
                    cp.set_pod_exit(ns, name, 0, json.dumps(EVAL_RESULT))
                    ended.add(name)
            phase = (
                json.loads(cp.kubectl("get", "dr", RUN, "-n", ns, "-o", "json").stdout).get("status", {}).get("phase")
            )
            assert phase != "Failed", f"the run failed\n{logs()}"
            if phase == "Succeeded" and prom.query(f'opd_operator_run_eval_score{{namespace="{ns}"}}'):
                end_at = time.time()
            time.sleep(0.5)
        print(
            "scenario from Prometheus' start: learner started (teacher ready) at"
            f" {learner_started - prom_started:.0f} s, live at {live_at - prom_started:.0f} s,"
            f" run succeeded and scraped at {end_at - prom_started:.0f} s"
        )
        yield Scraped(prom, ns, live_at, end_at, math.ceil(end_at - prom_started) + 5)


# ---- the dashboard's queries --------------------------------------------------------------------------


def panels(items: list[dict]) -> Iterator[dict]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every panel query."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"], t.get("legendFormat", ""))
        for p in panels(dashboard["panels"])
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's interpolation of ``$name`` and ``${name}`` (a single selected value: the raw value)."""

    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value in this test")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def source(expr: str) -> str:
    names = promql_metric_names(expr)
    if any(n.startswith("vllm:") for n in names):
        return "vllm"
    if names and all(n.startswith("opd_operator_") for n in names):
        return "operator"
    return "learner"


def template_variables(scraped: Scraped) -> dict[str, str]:
    """$namespace and $run as Grafana lists them (label_values queries of the dashboard's templating)."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {"__rate_interval": RATE_INTERVAL, "__range": f"{scraped.range_s}s"}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
        assert m, f"variable ${var['name']}: {query!r} is not a label_values() query"
        values = scraped.prom.label_values(m.group(2), substitute(m.group(1), variables))
        expected = {"namespace": scraped.namespace, "run": RUN}[var["name"]]
        assert expected in values, f"${var['name']} ({query}) lists {values}, not {expected}"
        variables[var["name"]] = expected
    return variables


def test_template_variables_list_the_scraped_namespace_and_run(scraped: Scraped):
    variables = template_variables(scraped)
    assert variables["namespace"] == scraped.namespace and variables["run"] == RUN


@pytest.mark.parametrize(
    ("title", "expr", "legend"), dashboard_targets(), ids=[f"{t}: {e[:40]}" for t, e, _ in dashboard_targets()]
)
def test_every_panel_query_returns_series_with_numbers_and_legend_labels(scraped: Scraped, title, expr, legend):
    variables = template_variables(scraped)
    query = substitute(expr, variables)
    at = scraped.end_at if source(expr) == "operator" else scraped.live_at
    # The query parses and evaluates at both moments; its data is checked when its source was scraped.
    for moment in (scraped.live_at, scraped.end_at):
        scraped.prom.query(query, at=moment)
    series = scraped.prom.query(query, at=at)
    assert series, f"panel {title!r}: {query} returned no series"
    values = [float(s["value"][1]) for s in series]
    assert any(math.isfinite(v) for v in values), f"panel {title!r}: {query} returned only {values}"
    wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    for s in series:
        assert wanted <= set(s["metric"]), f"panel {title!r}: legend {legend!r} but series labels {s['metric']}"


def test_all_namespaces_and_runs_select_the_same_series(scraped: Scraped):
    """The variables' "All" value (allValue .*) selects this run's learner series too."""
    everything = {"namespace": ".*", "run": ".*", "__rate_interval": RATE_INTERVAL, "__range": f"{scraped.range_s}s"}
    expr = next(e for _, e, _ in dashboard_targets() if e.startswith("opd_reverse_kl"))
    series = scraped.prom.query(substitute(expr, everything), at=scraped.live_at)
    assert {(s["metric"]["namespace"], s["metric"]["run"]) for s in series} >= {(scraped.namespace, RUN)}
