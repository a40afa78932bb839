"""The test control plane itself, against the real processes: the API server, the controllers (Job,
Deployment, garbage collector, ServiceAccount, volumes), the scheduler, PodSecurity, RBAC, and kwok's
stages that play the kubelet (pods run until a test makes them exit, with a code and a message)."""

from __future__ import annotations

import json

import pytest

from support.controlplane import NODE_NAME, STORAGE_CLASS, ApiError, ControlPlane, container


def job(name: str, *, backoff_limit: int = 0, gpus: int = 1) -> dict:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "containers": [container(resources=resources)],
                }
            },
        },
    }


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def running_pod(cp: ControlPlane, ns: str, selector: str) -> dict:
    return cp.wait_for_pod(
        ns,
        selector,
        lambda p: (
            p["status"].get("phase") == "Running"
            and condition(p, "Ready")
            and condition(p, "Ready")["status"] == "True"
        ),
        "Running",
    )


def job_condition(cp: ControlPlane, ns: str, name: str, type_: str) -> dict:
    return cp.wait(
        f"Job {ns}/{name} {type_}",
        lambda: (
            (c := condition(cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}"), type_))
            and c["status"] == "True"
            and c
        ),
    )


def test_apiserver_is_ready_serves_the_apis_the_operator_uses_and_gpu_node_is_ready(control_plane: ControlPlane):
    cp = control_plane
    ready = cp.get("/readyz?verbose")  # the API server's own checks, etcd among them
    assert "[+]etcd ok" in ready and "readyz check passed" in ready, ready
    served = {v["groupVersion"] for g in cp.get("/apis")["groups"] for v in g["versions"]}
    assert {"batch/v1", "apps/v1", "rbac.authorization.k8s.io/v1", "apiextensions.k8s.io/v1"} <= served
    jobs = next(r for r in cp.get("/apis/batch/v1")["resources"] if r["name"] == "jobs")
    assert {"create", "get", "list", "watch", "delete"} <= set(jobs["verbs"])
    version = json.loads(cp.kubectl("version", "-o", "json").stdout)
    client, server = version["clientVersion"], version["serverVersion"]
    # the kubectl release (not built here) and the server are within kubectl's supported version skew
    assert client["major"] == server["major"]
    assert abs(int(client["minor"]) - int(server["minor"])) <= 1
    node = json.loads(cp.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
    assert condition(node, "Ready")["status"] == "True"
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["status"]["allocatable"]["cpu"] == "64"
    assert "v4." in cp.helm("version", "--short").stdout
    # The cluster is shared by the session's tests: other releases may be installed.
    assert isinstance(json.loads(cp.helm("list", "--all-namespaces", "-o", "json").stdout), list)


def test_job_pod_runs_on_the_gpu_node_and_completes_with_its_termination_message(
    control_plane: ControlPlane, k8s_namespace: str
):
    cp, ns = control_plane, k8s_namespace
    cp.apply(job("ok"), namespace=ns)
    pod = running_pod(cp, ns, "job-name=ok")
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert pod["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["status"]["containerStatuses"][0]["state"]["running"]
    # Without the exit annotation it keeps running.
    assert condition(cp.get(f"/apis/batch/v1/namespaces/{ns}/jobs/ok"), "Complete") is None

    cp.set_pod_exit(ns, pod["metadata"]["name"], 0, '{"ok":1}')
    job_condition(cp, ns, "ok", "Complete")
    done = cp.get(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
    assert done["status"]["phase"] == "Succeeded"
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert json.loads(terminated["message"]) == {"ok": 1}


def test_nonzero_exit_fails_a_job_without_retries(control_plane: ControlPlane, k8s_namespace: str):
    cp, ns = control_plane, k8s_namespace
    cp.apply(job("bad", backoff_limit=0), namespace=ns)
    pod = running_pod(cp, ns, "job-name=bad")
    cp.set_pod_exit(ns, pod["metadata"]["name"], 3, "bad config")
    failed = job_condition(cp, ns, "bad", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    done = cp.get(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
    assert done["status"]["phase"] == "Failed"
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"], terminated["message"]) == (3, "Error", "bad config")
    assert len(cp.pods(ns, "job-name=bad")) == 1  # backoffLimit 0: no second pod


def test_deployment_pod_becomes_ready_and_its_service_has_an_endpoint(control_plane: ControlPlane, k8s_namespace: str):
    cp, ns = control_plane, k8s_namespace
    labels = {"app": "web"}
    cp.apply(
        [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [container(ports=[{"containerPort": 8000}])]},
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": 8000}]},
            },
        ],
        namespace=ns,
    )
    cp.wait(
        "Deployment web ready",
        lambda: cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/web")["status"].get("readyReplicas") == 1,
    )
    pod = cp.pods(ns, "app=web")[0]
    assert pod["status"]["podIP"]

    def ready_endpoint() -> bool:
        slices = cp.get(
            f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=kubernetes.io/service-name%3Dweb"
        )["items"]
        return any(
            ep["addresses"] == [pod["status"]["podIP"]] and ep["conditions"].get("ready")
            for s in slices
            for ep in s.get("endpoints") or []
        )

    cp.wait("an endpoint of Service web", ready_endpoint)


def test_pod_security_restricted_refuses_a_privileged_pod(control_plane: ControlPlane, k8s_namespace: str):
    cp, ns = control_plane, k8s_namespace
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "priv"},
        "spec": {
            "containers": [{"name": "main", "image": "registry.invalid/x", "securityContext": {"privileged": True}}]
        },
    }
    with pytest.raises(ApiError) as err:
        cp.request("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    assert err.value.status == 403
    assert 'violates PodSecurity "restricted:latest"' in str(err.value)
    assert "privileged" in str(err.value)
    # ... while the same namespace admits a restricted pod.
    ok = {**pod, "metadata": {"name": "fine"}, "spec": {"containers": [container()]}}
    cp.request("POST", f"/api/v1/namespaces/{ns}/pods", ok)


def test_background_deletion_of_a_job_removes_its_pods(control_plane: ControlPlane, k8s_namespace: str):
    cp, ns = control_plane, k8s_namespace
    cp.apply(job("gone"), namespace=ns)
    running_pod(cp, ns, "job-name=gone")
    cp.request(
        "DELETE",
        f"/apis/batch/v1/namespaces/{ns}/jobs/gone",
        {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
    )
    cp.wait("the Job's pods to be garbage-collected", lambda: cp.pods(ns, "job-name=gone") == [])


def test_rbac_of_a_serviceaccount(control_plane: ControlPlane, k8s_namespace: str):
    cp, ns = control_plane, k8s_namespace
    user = f"system:serviceaccount:{ns}:bot"
    cp.kubectl("create", "serviceaccount", "bot", f"--namespace={ns}")
    with pytest.raises(ApiError) as err:
        cp.get(f"/api/v1/namespaces/{ns}/secrets", as_user=user)
    assert err.value.status == 403
    denied = cp.kubectl("get", "secrets", f"--namespace={ns}", as_user=user, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr
    token_kubeconfig = cp.serviceaccount_kubeconfig(ns, "bot")
    assert (
        cp.kubectl(
            "auth", "can-i", "list", "secrets", f"--namespace={ns}", kubeconfig=token_kubeconfig, check=False
        ).stdout.strip()
        == "no"
    )

    cp.kubectl("create", "role", "secret-reader", "--verb=get,list", "--resource=secrets", f"--namespace={ns}")
    cp.kubectl(
        "create",
        "rolebinding",
        "bot-reads-secrets",
        "--role=secret-reader",
        f"--serviceaccount={ns}:bot",
        f"--namespace={ns}",
    )
    cp.wait(
        "the RoleBinding to take effect",
        lambda: cp.get(f"/api/v1/namespaces/{ns}/secrets", as_user=user)["kind"] == "SecretList",
    )
    assert cp.kubectl("get", "secrets", f"--namespace={ns}", kubeconfig=token_kubeconfig).returncode == 0
    # Only what the Role grants: still no access to another namespace.
    with pytest.raises(ApiError) as err:
        cp.get("/api/v1/namespaces/default/secrets", as_user=user)
    assert err.value.status == 403


def test_a_pvc_is_bound_and_a_pod_using_it_runs(control_plane: ControlPlane, k8s_namespace: str):
    cp, ns = control_plane, k8s_namespace
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "workspace"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "user", "labels": {"app": "user"}},
                "spec": {
                    "containers": [container(volumeMounts=[{"name": "ws", "mountPath": "/workspace"}])],
                    "volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": "workspace"}}],
                },
            },
        ],
        namespace=ns,
    )
    pod = running_pod(cp, ns, "app=user")
    assert pod["spec"]["nodeName"] == NODE_NAME
    pvc = cp.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/workspace")
    assert pvc["spec"]["storageClassName"] == STORAGE_CLASS  # the default class was filled in
    assert pvc["status"]["phase"] == "Bound"
    pv = cp.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
    assert pv["spec"]["capacity"]["storage"] == "10Gi"
    assert pv["spec"]["claimRef"]["uid"] == pvc["metadata"]["uid"]

    # The claim is protected while the pod uses it; deleting both releases and deletes the volume.
    cp.request("DELETE", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/workspace")
    assert cp.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/workspace")["metadata"]["deletionTimestamp"]
    cp.request("DELETE", f"/api/v1/namespaces/{ns}/pods/user")
    cp.wait(
        "the volume to be deleted",
        lambda: cp.get(f"/api/v1/persistentvolumes/{pv['metadata']['name']}", ok=(200, 404)).get("code") == 404,
    )
