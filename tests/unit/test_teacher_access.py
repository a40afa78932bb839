"""Who may talk to the served teacher: its API key (``spec.teacher.serving.apiKeySecret``) and its
NetworkPolicy (``spec.teacher.serving.networkPolicy``).

A real local HTTP server plays vLLM's authentication (vLLM's middleware answers 401 on /v1 without the
key; /health stays open): the learner's HTTP teacher client and serve-teacher's readiness check send the
key. The operator's objects (``opd-operator render``: the reconciler's own output) carry the key from the
Secret into exactly the teacher and distill pods, and a NetworkPolicy that admits only the run's distill
pods to the teacher's port. The same objects on a real API server: tests/k8s/test_rbac_k8s.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from opd_operator.render import render
from opd_runtime.contract import TEACHER_API_KEY_ENV
from opd_runtime.distill.server_teacher import ServerTeacher, TeacherRequestError
from opd_runtime.serving import served_models
from opd_runtime.spec import parse_run

ROOT = Path(__file__).resolve().parents[2]
KEY = "s3cret-key"


class KeyedServer(ThreadingHTTPServer):
    """/health answers anyone; /v1/models only ``Authorization: Bearer KEY`` (else 401, as vLLM does)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[str | None] = []  # the Authorization header of each /v1 request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: KeyedServer

    def do_GET(self) -> None:
        if self.path == "/health":
            return self._answer(200, {})
        auth = self.headers.get("Authorization")
        self.server.seen.append(auth)
        if auth != f"Bearer {KEY}":
            return self._answer(401, {"error": "Unauthorized"})
        return self._answer(200, {"data": [{"id": "teacher"}]})

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[KeyedServer]:
    srv = KeyedServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_the_http_teacher_client_sends_the_key(server: KeyedServer):
    assert ServerTeacher(server.url, api_key=KEY, retry_seconds=1).model() == "teacher"
    assert server.seen == [f"Bearer {KEY}"]


def test_a_teacher_without_the_key_is_refused_at_once_not_retried(server: KeyedServer):
    with pytest.raises(TeacherRequestError, match="HTTP 401"):
        ServerTeacher(server.url, retry_seconds=60).model()  # 401 is not transient: no 60 s of retries
    assert server.seen == [None]


def test_serve_teachers_readiness_check_sends_the_key(server: KeyedServer):
    assert served_models(server.url) is None  # without the key the server never looks ready
    assert served_models(server.url, KEY) == ["teacher"]


def test_the_learner_takes_the_key_from_the_environment(monkeypatch, server: KeyedServer, tmp_path: Path):
    from opd_runtime.distill.learner import _teacher
    from opd_runtime.workspace import Workspace

    doc = tiny_math(url=server.url)
    run = parse_run(doc)
    monkeypatch.setenv(TEACHER_API_KEY_ENV, KEY)
    teacher = _teacher(run, Workspace(tmp_path), run.spec.distill)
    assert teacher.model() == "teacher" and server.seen == [f"Bearer {KEY}"]


# ---- the operator's objects ---------------------------------------------------------------------------


def tiny_math(**serving: object) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-math.yaml").read_text())
    doc["spec"]["teacher"]["serving"].update(serving)
    return doc


def containers(objects: list[dict]) -> dict[str, dict]:
    """Stage (or teacher) name -> its container, for every pod template rendered."""
    out = {}
    for obj in objects:
        if obj["kind"] in ("Job", "Deployment"):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                out[c["name"]] = c
    return out


def test_the_key_reaches_the_teacher_and_distill_pods_from_the_secret_only():
    secret = {"name": "teacher-key", "key": "token"}
    pods = containers(render(tiny_math(apiKeySecret=secret), "team"))
    assert set(pods) == {"sft", "teacher", "distill", "eval"}
    want = {"name": TEACHER_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "teacher-key", "key": "token"}}}
    for name, container in pods.items():
        has = [e for e in container["env"] if e["name"] == TEACHER_API_KEY_ENV]
        assert has == ([want] if name in ("teacher", "distill") else []), name
        assert KEY not in json.dumps(container)  # the value itself is never in an object
    for container in containers(render(tiny_math(), "team")).values():
        assert TEACHER_API_KEY_ENV not in {e["name"] for e in container["env"]}


def test_a_partial_key_reference_is_refused_naming_the_field():
    from opd_runtime.spec import SpecError

    with pytest.raises(SpecError, match=r"spec\.teacher\.serving\.apiKeySecret\.key"):
        parse_run(tiny_math(apiKeySecret={"name": "teacher-key"}))


def test_the_network_policy_admits_only_the_runs_distill_pods_to_the_teacher_port():
    objects = render(tiny_math(port=8123), "team")
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["name"] == "tiny-math-teacher"
    assert policy["metadata"]["labels"]["opd.dev/run"] == "tiny-math"
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "DistillationRun"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8123}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector: pods of this namespace only

    def selects(selector: dict, obj: dict) -> bool:
        labels = obj["spec"]["template"]["metadata"]["labels"]
        return selector["matchLabels"].items() <= labels.items()

    by_name = {o["metadata"]["name"]: o for o in objects if o["kind"] in ("Job", "Deployment")}
    assert selects(spec["podSelector"], by_name["tiny-math-teacher"])
    assert [n for n, o in by_name.items() if selects(peer["podSelector"], o)] == ["tiny-math-distill-1"]
    assert objects.index(policy) < objects.index(by_name["tiny-math-teacher"])  # never an open teacher


def test_no_network_policy_when_turned_off_or_nothing_is_served():
    assert not [o for o in render(tiny_math(networkPolicy=False), "team") if o["kind"] == "NetworkPolicy"]
    rl = yaml.safe_load((ROOT / "examples" / "tiny-math-rl.yaml").read_text())
    assert not [o for o in render(rl, "team") if o["kind"] == "NetworkPolicy"]
