"""charts/opd-operator against the real API server of the test control plane (tests/support/controlplane):

- every object each documented variant renders is accepted (server-side dry-run apply, PodSecurity
  `restricted` enforced in the namespace, the prometheus-operator CRDs installed for the monitors);
- a real `helm install`, `upgrade` and `uninstall` (the CRD is upgraded with the chart and kept after it);
- values outside the schema make `helm install` fail naming the value;
- least privilege, by impersonating the chart's ServiceAccount: it can do everything operator/rbac.py
  lists and nothing else (no Secrets, no cluster-wide writes), in the namespaces it watches only;
- the operator itself, authenticated as that ServiceAccount, drives examples/tiny-math.yaml to Succeeded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from support import monitoring_crds
from support.chart import CHART, CRD, ROOT, VALUES_FILES, install, load_sync, render_text, rule_triples, uninstall
from support.controlplane import ControlPlane
from support.processes import free_port

# What every authenticated identity may do (the system:basic-user and system:discovery ClusterRoles).
BASIC = {
    ("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
    ("authorization.k8s.io", "selfsubjectrulesreviews", "create"),
    ("authentication.k8s.io", "selfsubjectreviews", "create"),
}


@pytest.fixture(scope="module")
def cp(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with the prometheus-operator CRDs (ServiceMonitor, PodMonitor) installed."""
    for path in monitoring_crds.ensure():
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    control_plane.wait_established(*(f"{kind}.monitoring.coreos.com" for kind in monitoring_crds.KINDS))
    return control_plane


def sa_user(namespace: str, release: str) -> str:
    return f"system:serviceaccount:{namespace}:{release}-opd-operator"


def review(cp: ControlPlane, user: str, verb: str, group: str, resource: str, namespace: str | None) -> bool:
    """SelfSubjectAccessReview while impersonating ``user``: may it do ``verb`` on ``group/resource``?"""
    resource, _, sub = resource.partition("/")
    attrs = {"verb": verb, "group": group, "resource": resource}
    if sub:
        attrs["subresource"] = sub
    if namespace:
        attrs["namespace"] = namespace
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attrs},
    }
    return cp.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body, as_user=user)["status"][
        "allowed"
    ]


def granted_in(cp: ControlPlane, user: str, namespace: str) -> set[tuple[str, str, str]]:
    """Every (group, resource, verb) ``user`` holds in ``namespace`` (SelfSubjectRulesReview, impersonated)."""
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview", "spec": {"namespace": namespace}}
    status = cp.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews", body, as_user=user)["status"]
    assert not status.get("incomplete"), status
    return rule_triples(status["resourceRules"])


def operator_rules() -> tuple[list[dict], list[dict]]:
    """(rules on namespaced resources, rules on cluster-scoped ones) of operator/rbac.py."""
    from opd_operator.rbac import OPERATOR_RULES

    sync = load_sync()
    return (
        [r for r in OPERATOR_RULES if not sync.is_cluster_scoped(r)],
        [r for r in OPERATOR_RULES if sync.is_cluster_scoped(r)],
    )


# Things the operator never needs; asked of every install, in the watched namespace and cluster-wide.
FORBIDDEN_IN_NAMESPACE = [
    (verb, "", "secrets") for verb in ("get", "list", "watch", "create", "update", "patch", "delete")
] + [
    ("create", "", "pods"),
    ("create", "", "pods/exec"),
    ("create", "", "pods/portforward"),
    ("create", "", "serviceaccounts/token"),
    ("update", "apps", "deployments"),
    ("update", "batch", "jobs"),
    ("patch", "batch", "jobs"),
    ("escalate", "rbac.authorization.k8s.io", "roles"),
    ("bind", "rbac.authorization.k8s.io", "roles"),
    ("create", "opd.dev", "distillationruns"),
    ("delete", "opd.dev", "distillationruns"),
    ("create", "", "resourcequotas"),
]
FORBIDDEN_CLUSTER_WIDE = (
    [(verb, "", "secrets") for verb in ("get", "list", "watch")]
    + [
        (verb, group, resource)
        for group, resource in [
            ("rbac.authorization.k8s.io", "clusterroles"),
            ("rbac.authorization.k8s.io", "clusterrolebindings"),
            ("", "namespaces"),
            ("", "nodes"),
            ("", "persistentvolumes"),
            ("storage.k8s.io", "storageclasses"),
            ("scheduling.k8s.io", "priorityclasses"),
            ("admissionregistration.k8s.io", "validatingwebhookconfigurations"),
            ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
            ("apiextensions.k8s.io", "customresourcedefinitions"),
            ("certificates.k8s.io", "certificatesigningrequests"),
        ]
        for verb in ("create", "update", "patch", "delete")
    ]
    + [("impersonate", "", "users"), ("impersonate", "", "serviceaccounts"), ("get", "", "nodes")]
)


# ---- every rendered object is accepted --------------------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES], ids=["defaults", *(p.stem for p in VALUES_FILES)])
def test_rendered_objects_are_accepted_by_the_api_server(cp: ControlPlane, values_file):
    ns = cp.new_namespace("chart-dry-run")
    text = render_text(values_file, namespace=ns, release="dry")
    kinds = {d["kind"] for d in yaml.safe_load_all(text) if d}
    proc = cp.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "--field-manager=opd-chart-test",
        "-f",
        "-",
        input=text,
    )
    assert len([ln for ln in proc.stdout.splitlines() if "(server dry run)" in ln]) == len(
        [d for d in yaml.safe_load_all(text) if d]
    ), proc.stdout
    # The namespace enforces the `restricted` Pod Security Standard; the pod template must meet it.
    assert "PodSecurity" not in proc.stderr, proc.stderr
    assert "Deployment" in kinds


# ---- a real install ---------------------------------------------------------------------------------------


def test_helm_install_upgrade_and_uninstall(cp: ControlPlane):
    ns = cp.new_namespace("opd-system")
    release = "opd-life"
    out = install(cp, release, ns)
    assert "kubectl -n" in out and "get dr -w" in out  # NOTES

    crd = json.loads(cp.kubectl("get", "crd", CRD, "-o", "json").stdout)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    # The operator pods (two: leader and standby) were admitted under PodSecurity `restricted` and run as
    # the chart's ServiceAccount.
    pods = cp.pods(ns, f"app.kubernetes.io/instance={release}")
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == f"{release}-opd-operator"
        assert pod["status"]["phase"] == "Running"
    # The example run validates against the installed CRD.
    cp.kubectl("apply", "--dry-run=server", "-n", ns, "-f", str(ROOT / "examples" / "tiny-math.yaml"))

    cp.helm(
        "upgrade",
        release,
        str(CHART),
        "--namespace",
        ns,
        "--set",
        "operator.logLevel=debug",
        "--wait",
        "--timeout",
        "120s",
    )
    dep = json.loads(cp.kubectl("get", "deployment", "-n", ns, f"{release}-opd-operator", "-o", "json").stdout)
    assert "--debug" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"  # safe: a new pod waits for the Lease

    cp.helm("uninstall", release, "--namespace", ns, "--wait", "--timeout", "120s")
    assert cp.kubectl("get", "deployment", "-n", ns, f"{release}-opd-operator", check=False).returncode != 0
    assert cp.kubectl("get", "clusterrole", f"{release}-opd-operator", check=False).returncode != 0
    # Deleting the CRD would delete every run in the cluster: it stays.
    assert cp.kubectl("get", "crd", CRD, check=False).returncode == 0


def test_helm_install_rejects_values_outside_the_schema(cp: ControlPlane, tmp_path):
    ns = cp.new_namespace("opd-bad-values")
    bad = tmp_path / "values.yaml"
    bad.write_text("watch:\n  allNamespace: false\nmetrics:\n  port: http\n")
    proc = cp.helm("install", "opd-bad", str(CHART), "--namespace", ns, "--values", str(bad), check=False)
    assert proc.returncode != 0
    assert "additional properties 'allNamespace' not allowed" in proc.stderr
    assert "/metrics/port" in proc.stderr and "want integer" in proc.stderr
    assert cp.helm("list", "--namespace", ns, "-q").stdout.strip() == ""


# ---- least privilege ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_wide_release(cp: ControlPlane):
    ns = cp.new_namespace("opd-rbac-all")
    install(cp, "opd-all", ns)
    yield ns, sa_user(ns, "opd-all")
    uninstall(cp, "opd-all", ns)


@pytest.fixture(scope="module")
def namespaced_release(cp: ControlPlane):
    ns = cp.new_namespace("opd-rbac-ns")
    install(cp, "opd-ns", ns, "--values", str(CHART / "ci" / "namespaced-values.yaml"))
    yield ns, sa_user(ns, "opd-ns")
    uninstall(cp, "opd-ns", ns)


def test_cluster_wide_operator_can_do_what_it_uses_in_any_namespace(cp: ControlPlane, cluster_wide_release):
    ns, user = cluster_wide_release
    namespaced, cluster = operator_rules()
    elsewhere = cp.new_namespace("team")
    for where in (ns, elsewhere):
        missing = [t for t in rule_triples(namespaced) if not review(cp, user, t[2], t[0], t[1], where)]
        assert not missing, f"the operator lacks in {where}: {missing}"
    missing = [t for t in rule_triples(cluster) if not review(cp, user, t[2], t[0], t[1], None)]
    assert not missing, f"the operator lacks cluster-wide: {missing}"


def test_cluster_wide_operator_holds_nothing_else(cp: ControlPlane, cluster_wide_release):
    ns, user = cluster_wide_release
    namespaced, cluster = operator_rules()
    extra = granted_in(cp, user, cp.new_namespace("team")) - rule_triples(namespaced + cluster) - BASIC
    assert not extra, f"the chart grants more than operator/rbac.py: {sorted(extra)}"
    allowed = [t for t in FORBIDDEN_IN_NAMESPACE if review(cp, user, t[0], t[1], t[2], ns)]
    allowed += [t for t in FORBIDDEN_CLUSTER_WIDE if review(cp, user, t[0], t[1], t[2], None)]
    assert not allowed, f"the operator may: {allowed}"


def test_namespaced_operator_is_confined_to_its_namespace(cp: ControlPlane, namespaced_release):
    ns, user = namespaced_release
    namespaced, _ = operator_rules()
    missing = [t for t in rule_triples(namespaced) if not review(cp, user, t[2], t[0], t[1], ns)]
    assert not missing, f"the operator lacks in its namespace: {missing}"
    # rbac.clusterDiscovery is off in this variant: not even kopf's cluster-wide reads. The release
    # namespace also holds the leader-election Lease rules (get/update limited to the release's Lease).
    from opd_operator.rbac import leader_election_rules

    lease_rules = rule_triples(leader_election_rules("opd-ns-opd-operator"))
    assert granted_in(cp, user, ns) - BASIC == rule_triples(namespaced) | lease_rules
    other = cp.new_namespace("team")
    assert granted_in(cp, user, other) - BASIC == set()
    leaks = [t for t in rule_triples(namespaced) if review(cp, user, t[2], t[0], t[1], None)]
    assert not leaks, f"cluster-wide grants in a namespaced install: {leaks}"
    allowed = [t for t in FORBIDDEN_IN_NAMESPACE if review(cp, user, t[0], t[1], t[2], ns)]
    allowed += [t for t in FORBIDDEN_CLUSTER_WIDE if review(cp, user, t[0], t[1], t[2], None)]
    assert not allowed, f"the operator may: {allowed}"


def test_impersonated_operator_requests_succeed_or_are_forbidden(cp: ControlPlane, namespaced_release):
    """Real requests as the chart's ServiceAccount: what the operator does works, the rest is refused."""
    ns, user = namespaced_release
    from opd_operator.rbac import stage_rules

    def as_sa(*args: str, check: bool = True):
        return cp.kubectl(*args, "--namespace", ns, as_user=user, check=check)

    denied = as_sa("get", "secrets", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    denied = as_sa("create", "clusterrole", "x", "--verb=get", "--resource=pods", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    other = cp.new_namespace("team")
    denied = cp.kubectl("create", "configmap", "x", "--namespace", other, as_user=user, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    as_sa("create", "configmap", "run-config", "--from-literal=run.yaml=x")
    as_sa("create", "serviceaccount", "demo-stage")
    # The per-run Role of the stage pods: RBAC lets the operator grant it because it holds those rules.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "demo-stage"},
        "rules": stage_rules("demo"),
    }
    cp.kubectl("create", "--namespace", ns, "-f", "-", input=json.dumps(role), as_user=user)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "demo-stage"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "demo-stage"},
        "subjects": [{"kind": "ServiceAccount", "name": "demo-stage", "namespace": ns}],
    }
    cp.kubectl("create", "--namespace", ns, "-f", "-", input=json.dumps(binding), as_user=user)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "demo-eval"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/opd:test",
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"},
                            },
                        }
                    ],
                }
            }
        },
    }
    cp.kubectl("create", "--namespace", ns, "-f", "-", input=json.dumps(job), as_user=user)
    as_sa("get", "jobs,pods,deployments,services,persistentvolumeclaims")
    as_sa("delete", "job", "demo-eval")


# ---- the operator runs with exactly the chart's permissions -------------------------------------------

STAGE_RESULTS = {  # termination messages of the stage pods (opd_runtime.stage_report's format)
    "sft": {"stage": "sft", "step": 400, "checkpoint": "/workspace/checkpoints/sft/final"},
    "distill": {
        "stage": "distill",
        "step": 200,
        "reverse_kl": 0.42,
        "checkpoint": "/workspace/checkpoints/distill/final",
    },
    "eval": {"stage": "eval", "eval_score": 0.41, "scores": {"distill/tinymath": 0.41}},
}


def test_operator_with_the_charts_serviceaccount_drives_tiny_math_to_succeeded(cp: ControlPlane, tmp_path):
    """The chart installed for its release namespace; the operator process (python -m opd_operator) runs
    here with a real token of the chart's ServiceAccount, so every request it makes is authorised by the
    chart's RBAC alone. kwok plays the kubelet: the test ends each stage pod with the stage's result.
    At the end the operator's /metrics carry what the Grafana dashboard reads."""
    ns = cp.new_namespace("opd-e2e")
    release = "opd-e2e"
    install(cp, release, ns, "--set", "watch.allNamespaces=false")
    kubeconfig = cp.serviceaccount_kubeconfig(ns, f"{release}-opd-operator")
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONSAFEPATH": "1",
        "OPD_RESYNC_SECONDS": "1",
        "POD_NAMESPACE": ns,  # what the chart's downward API gives the pod: the Lease's namespace
    }
    log_path = tmp_path / "operator.log"
    metrics_port = free_port()
    with open(log_path, "w") as log:
        operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opd_operator",
                "--namespace",
                ns,
                "--liveness=",
                f"--metrics-port={metrics_port}",
                "--leader-elect",  # as the chart runs it: the chart's Role must grant the Lease
                f"--leader-elect-resource-name={release}-opd-operator",
            ],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        cp.apply((ROOT / "examples" / "tiny-math.yaml").read_text(), namespace=ns)
        finished: set[str] = set()
        deadline = time.monotonic() + 240
        phase = None
        while time.monotonic() < deadline:
            assert operator.poll() is None, f"the operator exited:\n{log_path.read_text()[-4000:]}"
            for pod in cp.pods(ns, "app.kubernetes.io/name=opd"):
                stage = pod["metadata"]["labels"].get("opd.dev/stage")
                name = pod["metadata"]["name"]
                if stage in STAGE_RESULTS and name not in finished and pod["status"].get("phase") == "Running":
                    cp.set_pod_exit(ns, name, 0, json.dumps(STAGE_RESULTS[stage]))
                    finished.add(name)
            run = json.loads(cp.kubectl("get", "dr", "tiny-math", "-n", ns, "-o", "json").stdout)
            phase = run.get("status", {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(1)
        status = run.get("status", {})
        assert phase == "Succeeded", (
            f"phase {phase}; status {json.dumps(status)[:2000]}\noperator log:\n{log_path.read_text()[-4000:]}"
        )
        assert status["evalScore"] == 0.41 and status["reverseKL"] == 0.42
        assert {p["metadata"]["labels"]["opd.dev/stage"] for p in cp.pods(ns, "app.kubernetes.io/name=opd")} >= {
            "sft",
            "distill",
            "eval",
        }
        # The operator's metrics that the Grafana dashboard reads.
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            )
            for s in family.samples
        }
        assert samples[("opd_operator_run_eval_score", (("namespace", ns), ("run", "tiny-math")))] == 0.41
        assert samples[("opd_operator_runs", (("phase", "Succeeded"),))] == 1
        # Observed, not only created: the operator creates every (stage, outcome) series at 0 when it starts.
        observed = {
            dict(k[1]).get("stage")
            for k, v in samples.items()
            if k[0] == "opd_operator_stage_duration_seconds_count" and v
        }
        assert observed >= {
            "sft",
            "distill",
            "eval",
        }
        # It led under the chart's Lease rules (in the release namespace, named like the release).
        assert samples[("opd_operator_leader", ())] == 1
        lease = cp.get(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{release}-opd-operator")
        assert lease["spec"]["holderIdentity"] in log_path.read_text()
        # Nothing the operator tried was refused.
        assert "403" not in log_path.read_text() and "Forbidden" not in log_path.read_text()
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=20)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
        uninstall(cp, release, ns)
