"""pytest plugin (``pytest_plugins = ["controlplane.fixtures"]``): a real Kubernetes control plane.

``control_plane`` (session): one cluster shared by every test that asks for it, started on first use
(binaries built on the very first run, then taken from the cache) and stopped at the end of the session.
If it cannot be built or started the test FAILS with the error, never skips.
``k8s_namespace`` (function): a fresh namespace with PodSecurity ``restricted`` enforced, deleted after the test.
A failing test that used the cluster gets the components' last log lines in its report.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest

from . import binaries, node
from .cluster import ControlPlane, start

_FAILED_TO_START: list[str] = []


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    if _FAILED_TO_START:  # do not try again for every test
        pytest.fail(_FAILED_TO_START[0], pytrace=False)
    try:
        if binaries.missing():  # the first run builds for minutes: show its progress, uncaptured
            capman = request.config.pluginmanager.getplugin("capturemanager")
            with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
                binaries.ensure_binaries()
        cp = start()
    except Exception as err:  # a clear failure, never a skip
        _FAILED_TO_START.append(f"cannot start the test Kubernetes control plane: {type(err).__name__}: {err}")
    if _FAILED_TO_START:
        pytest.fail(_FAILED_TO_START[0], pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def real_node(request: pytest.FixtureRequest) -> Iterator[node.RealNode]:
    """A second control plane with one real node (``node.py``): pods run in containers. Fails, never
    skips, when it cannot start; its teardown fails the run if it leaves anything on the machine."""
    try:
        if binaries.missing(binaries.COMPONENTS + binaries.NODE_COMPONENTS):
            capman = request.config.pluginmanager.getplugin("capturemanager")
            with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
                binaries.ensure_binaries()
                binaries.ensure_node_binaries()
        rn = node.start()
    except Exception as err:
        pytest.fail(f"cannot start the real node: {type(err).__name__}: {err}", pytrace=False)
    try:
        yield rn
    finally:
        rn.stop()
        left = node.leftovers(rn)
        assert not left, f"the real node's teardown left: {left}"


@pytest.fixture
def k8s_namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    prefix = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    name = control_plane.new_namespace(prefix or "test")
    yield name
    # Deleted (without waiting) so what a test left running -- a teacher holding the fake node's 8 GPUs --
    # cannot make a later test's pods unschedulable: the suite's outcome must not depend on test order.
    control_plane.request("DELETE", f"/api/v1/namespaces/{name}", ok=(200, 202, 404))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and call.when == "call" and "control_plane" in getattr(item, "fixturenames", ()):
        cp = item.funcargs.get("control_plane")
        if isinstance(cp, ControlPlane):
            report.sections.append(("control plane logs", cp.dump()))
    if report.failed and call.when == "call" and "real_node" in getattr(item, "fixturenames", ()):
        rn = item.funcargs.get("real_node")
        if isinstance(rn, node.RealNode) and rn.cp is not None:
            report.sections.append(("real node logs", rn.cp.dump()))
    return report
