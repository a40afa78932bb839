"""A small synchronous Kubernetes REST client over plain dicts, and applying a Decision with it.

Credentials come from the official client's config loader (kubeconfig, exec plugins, or the in-cluster
ServiceAccount); requests are urllib3 calls on the API paths below, so every object stays a dict the
pure modules understand.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from opd_runtime.contract import API_VERSION, GROUP, PLURAL, VERSION

from . import metrics, names
from .observe import KINDS
from .walk import Action, Event

Manifest = dict[str, Any]
log = logging.getLogger("opd_operator")

# kind -> (API prefix, plural); all namespaced.
RESOURCES: dict[str, tuple[str, str]] = {
    "DistillationRun": (f"/apis/{GROUP}/{VERSION}", PLURAL),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),  # leader election (leader.py)
}


class ApiError(RuntimeError):
    reason = "ReconcileError"  # the run's Ready condition and Event reason when the API refuses an action

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class ForeignObject(ApiError):
    """A child's name is taken by an object the operator did not make for this run: it is never adopted
    (its content, e.g. a ConfigMap's run file or a ServiceAccount's bindings, could be anyone's)."""

    reason = "ForeignObject"

    def __init__(self, kind: str, name: str, run: str):
        super().__init__(
            409,
            f"{kind} {name} already exists without the label {names.RUN_LABEL}={run} of this run, so the "
            f"operator does not use it. Delete or rename that {kind} (or give the run another name); the "
            f"run continues once the name is free.",
        )
        self.kind, self.name = kind, name


class Api(Protocol):
    def get(self, kind: str, namespace: str, name: str) -> Manifest | None: ...
    def list(self, kind: str, namespace: str, selector: str, fields: str = "") -> list[Manifest]: ...
    def create(self, namespace: str, body: Manifest) -> bool: ...
    def patch(self, kind: str, namespace: str, name: str, patch: Manifest, *, subresource: str = "") -> None: ...
    def delete(self, kind: str, namespace: str, name: str) -> None: ...


def path(kind: str, namespace: str, name: str = "", subresource: str = "") -> str:
    prefix, plural = RESOURCES[kind]
    out = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    if name:
        out += f"/{quote(name)}"
    if subresource:
        out += f"/{subresource}"
    return out


HTTP_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def request_kind(method: str, url_path: str) -> tuple[str, str]:
    """The RBAC verb and resource of a request on a namespaced API path: GET .../jobs is ("list",
    "jobs"), PATCH .../distillationruns/x/status is ("patch", "distillationruns/status")."""
    parts = url_path.strip("/").split("/")
    rest = parts[parts.index("namespaces") + 2 :] if "namespaces" in parts else parts[-1:]  # plural[/name[/sub]]
    verb = HTTP_VERBS.get(method, "get" if len(rest) > 1 else "list")
    return verb, "/".join(rest[:1] + rest[2:3])


class RestApi:
    """``Api`` against a real API server (kubeconfig or in-cluster credentials)."""

    def __init__(self, timeout: float = 30.0, kubeconfig: str | None = None):
        """In-cluster credentials, else $KUBECONFIG; ``kubeconfig`` names a file instead (tests)."""
        import urllib3
        from kubernetes import client, config

        if kubeconfig:
            self.cfg = client.Configuration()
            config.load_kube_config(config_file=kubeconfig, client_configuration=self.cfg)  # type: ignore[no-untyped-call]
        else:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            self.cfg = client.Configuration.get_default_copy()
        self.timeout = timeout
        self.http = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED" if self.cfg.verify_ssl else "CERT_NONE",
            ca_certs=self.cfg.ssl_ca_cert,
            cert_file=self.cfg.cert_file,
            key_file=self.cfg.key_file,
            maxsize=8,
        )

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "opd-operator"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.cfg.refresh_api_key_hook is not None:
            self.cfg.refresh_api_key_hook(self.cfg)  # in-cluster: re-read the rotating token
        token = self.cfg.get_api_key_with_prefix("authorization") or self.cfg.get_api_key_with_prefix("BearerToken")
        if token:
            headers["Authorization"] = token
        return headers

    def request(
        self,
        method: str,
        url_path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        ok_missing: bool = False,
    ) -> Manifest | None:
        import urllib3

        verb, resource = request_kind(method, url_path)
        metrics.API_REQUESTS.labels(verb=verb, resource=resource).inc()
        url = self.cfg.host.rstrip("/") + url_path + (f"?{urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        try:
            resp = self.http.request(
                method,
                url,
                body=data,
                headers=self._headers(content_type if data else None),
                timeout=self.timeout,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as err:
            # a timeout or a dropped connection is a failed request like a 5xx (urllib3's errors are neither
            # ApiError nor OSError): every caller's retry or report then covers it
            raise ApiError(0, f"no answer from the API server for {method} {url_path}: {err}") from err
        if ok_missing and resp.status == 404:
            return None
        payload = json.loads(resp.data) if resp.data else {}
        if resp.status >= 300:
            raise ApiError(
                resp.status, payload.get("message", resp.data[:300]) if isinstance(payload, dict) else str(payload)
            )
        return payload

    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        return self.request("GET", path(kind, namespace, name), ok_missing=True)

    def list(self, kind: str, namespace: str, selector: str, fields: str = "") -> list[Manifest]:
        """Objects matching label ``selector`` (and field selector ``fields``, when given)."""
        query = {"labelSelector": selector} | ({"fieldSelector": fields} if fields else {})
        out = self.request("GET", path(kind, namespace), query=query) or {}
        items: list[Manifest] = out.get("items", [])
        return items

    def create(self, namespace: str, body: Manifest) -> bool:
        """Create ``body``; False when it already exists (409)."""
        try:
            self.request("POST", path(body["kind"], namespace), body)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    def patch(self, kind: str, namespace: str, name: str, patch: Manifest, *, subresource: str = "") -> None:
        self.request(
            "PATCH", path(kind, namespace, name, subresource), patch, content_type="application/merge-patch+json"
        )

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete (children with it, in the background); already gone is fine."""
        self.request("DELETE", path(kind, namespace, name), {"propagationPolicy": "Background"}, ok_missing=True)


# ---- applying a decision ---------------------------------------------------------------------------


def list_children(api: Api, namespace: str, run: str) -> dict[str, list[Manifest]]:
    selector = names.selector(run)
    return {kind: api.list(kind, namespace, selector) for kind in KINDS}


def is_ours(existing: Manifest, wanted: Manifest) -> bool:
    """Whether an existing object is the one the operator made for this run: it carries the run's label
    (an object in the run's label selector) and the operator's managed-by label."""
    have = existing["metadata"].get("labels") or {}
    want = wanted["metadata"].get("labels") or {}
    return all(have.get(key) == want.get(key) for key in (names.RUN_LABEL, "app.kubernetes.io/managed-by"))


def apply_action(api: Api, namespace: str, action: Action) -> None:
    """Apply one action. A create answered 409 reads the object that holds the name: the run's own (a
    list that lagged) is fine; anything else raises ``ForeignObject`` instead of being adopted."""
    if action.verb == "create":
        assert action.body is not None
        if not api.create(namespace, action.body):
            existing = api.get(action.kind, namespace, action.name)
            if existing is not None and not is_ours(existing, action.body):
                run = (action.body["metadata"].get("labels") or {}).get(names.RUN_LABEL, "")
                raise ForeignObject(action.kind, action.name, run)
            log.debug("%s %s already exists", action.kind, action.name)
    elif action.verb == "delete":
        api.delete(action.kind, namespace, action.name)
    else:
        assert action.body is not None
        api.patch(action.kind, namespace, action.name, action.body)


def post_event(api: Api, run: Manifest, event: Event, now: str) -> None:
    """A core/v1 Event about the run (shown by ``kubectl describe dr``); failures are only logged."""
    meta = run["metadata"]
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": "DistillationRun",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": names.MANAGER},
        "reportingComponent": names.MANAGER,
        "reportingInstance": names.MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        api.create(meta["namespace"], body)
    except (ApiError, OSError) as err:
        log.warning("could not post event %s for %s/%s: %s", event.reason, meta["namespace"], meta["name"], err)
