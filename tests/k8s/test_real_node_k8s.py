"""Pods in real containers on the real node (tests/support/controlplane/node.py), as a cluster runs them.

Under PodSecurity ``restricted``: a Deployment behind a Service with a readiness probe the kubelet runs, a
Job that finds the Service by its DNS name, fetches from it through kube-proxy and writes to a claim that
the local-path provisioner binds, and a later pod that reads the claim back (``kubectl logs`` through the
kubelet). Teardown of the node is checked by the ``real_node`` fixture.
"""

from __future__ import annotations

import json

import pytest

from support.controlplane import ControlPlaneError, restricted_security_context
from support.controlplane.node import BUSYBOX_IMAGE, NODE_NAME, PROVISIONER

pytestmark = [pytest.mark.k8s, pytest.mark.node]


def _busybox(name: str, script: str, **extra: object) -> dict:
    return {
        "name": name,
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
        "securityContext": restricted_security_context(),
        **extra,
    }


def _manifests(ns: str) -> list[dict]:
    web_labels = {"app": "web"}
    serve = 'echo "served by $HOSTNAME" > /www/index.html && exec httpd -f -p 8080 -h /www'
    fetch = (
        f"nslookup web.{ns}.svc.cluster.local && "
        f"wget -q -O /data/fetched http://web.{ns}.svc.cluster.local/ && id -u > /data/uid"
    )
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": web_labels},
                "template": {
                    "metadata": {"labels": web_labels},
                    "spec": {
                        "containers": [
                            _busybox(
                                "web",
                                serve,
                                ports=[{"containerPort": 8080}],
                                readinessProbe={"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                                volumeMounts=[{"name": "www", "mountPath": "/www"}],
                            )
                        ],
                        "volumes": [{"name": "www", "emptyDir": {}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": web_labels, "ports": [{"port": 80, "targetPort": 8080}]},
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": ns},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "writer", "namespace": ns},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            _busybox("writer", fetch, volumeMounts=[{"name": "data", "mountPath": "/data"}])
                        ],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
                    }
                },
            },
        },
    ]


def test_restricted_workloads_run_in_real_containers(real_node):
    cp = real_node.cp
    ns = cp.new_namespace("real-node")

    # PodSecurity restricted is enforced here: a pod that may escalate privileges is refused.
    loose = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "loose"}}
    loose["spec"] = {"containers": [{"name": "c", "image": BUSYBOX_IMAGE, "command": ["true"]}]}
    with pytest.raises(ControlPlaneError, match="violates PodSecurity"):
        cp.apply(loose, namespace=ns)

    cp.apply(_manifests(ns))

    def finished() -> dict | None:
        status = cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/writer")["status"]
        return status if status.get("succeeded") or status.get("failed") else None

    status = cp.wait("Job writer to finish", finished, timeout=240, component="kubelet")
    writer = cp.pods(ns, "job-name=writer")[0]
    logs = cp.kubectl("logs", f"--namespace={ns}", writer["metadata"]["name"], check=False)
    assert cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/writer")["status"].get("succeeded") == 1, (
        f"writer did not succeed ({status}): {json.dumps(writer['status'])[:2000]}\n{logs.stdout}{logs.stderr}"
    )
    assert writer["spec"]["nodeName"] == NODE_NAME
    assert writer["status"]["podIP"].startswith("10.77.0.")
    # nslookup printed the Service's ClusterIP: CoreDNS answered from the cluster's state.
    service_ip = cp.get(f"/api/v1/namespaces/{ns}/services/web")["spec"]["clusterIP"]
    assert service_ip in logs.stdout, logs.stdout

    claim = cp.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/data")
    assert claim["status"]["phase"] == "Bound"
    volume = cp.get(f"/api/v1/persistentvolumes/{claim['spec']['volumeName']}")
    assert volume["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == PROVISIONER

    # A later pod reads what the Job left on the claim: the page came from the web pod, through its Service.
    web_pod = cp.wait_for_pod(ns, "app=web", lambda p: p["status"].get("phase") == "Running", "Running")
    reader = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "reader", "namespace": ns},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                _busybox("reader", "cat /data/fetched /data/uid", volumeMounts=[{"name": "data", "mountPath": "/data"}])
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        },
    }
    cp.apply(reader)
    cp.wait_for_pod(
        ns,
        "",
        lambda p: p["metadata"]["name"] == "reader" and p["status"].get("phase") == "Succeeded",
        "Succeeded",
        timeout=120,
    )
    out = cp.kubectl("logs", f"--namespace={ns}", "reader").stdout.split("\n")
    assert out[:2] == [f"served by {web_pod['metadata']['name']}", "1000"], out
