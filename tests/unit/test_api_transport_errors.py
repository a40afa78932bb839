"""A request the API server never answers, or a connection it drops, reaches the operator's callers as
``ApiError`` (which every retry and report path catches), not as urllib3's own exception types: a standby
replica waiting for the Lease was seen crashing on urllib3's ReadTimeoutError."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from opd_operator.kube import ApiError, RestApi

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:%d"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


@pytest.fixture
def silent_server():
    """A listening socket that accepts connections and never answers (then closes them)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    srv.close()


def test_a_request_that_times_out_is_an_api_error(silent_server, tmp_path):
    config = tmp_path / "kubeconfig"
    config.write_text(KUBECONFIG % silent_server)
    api = RestApi(timeout=0.5, kubeconfig=str(config))
    start = time.monotonic()
    with pytest.raises(ApiError, match="no answer from the API server for GET") as err:
        api.get("Lease", "ns", "opd-operator")
    assert err.value.status == 0 and time.monotonic() - start < 5


def test_a_refused_connection_is_an_api_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "kubeconfig"
    config.write_text(KUBECONFIG % port)
    with pytest.raises(ApiError, match="no answer from the API server"):
        RestApi(timeout=0.5, kubeconfig=str(config)).list("Job", "ns", "a=b")
