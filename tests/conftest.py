"""Fixtures for every folder, and the markers a test gets from the folder it lives in.

tests/unit: pure and fast (no torch model, no cluster, no engine). tests/training: torch on tiny models.
tests/vllm: the real vLLM engine. tests/k8s: the test control plane (tests/support/controlplane).
tests/e2e: whole runs of the CLI. tests/containers: images built and run with a real Docker engine.
Helpers that are not fixtures live in tests/support (``import support.<module>``).

``random_models`` (session): *untrained* Qwen3-architecture models (support.models) for the mechanics
tests; the trained tiny world is tests/vllm/conftest.py's ``tiny_world``. ``qwen3_tokenizer_dir``: Qwen3's
real tokenizer, fetched once into the cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opd_runtime.contract import NO_USAGE_STATS_ENV

from support.models import RandomModels, build_random_models, cache_dir, fetch_qwen3_tokenizer

TESTS = Path(__file__).resolve().parent

# The real Kubernetes control plane (session fixtures `control_plane`, `real_node`; namespaces `k8s_namespace`).
pytest_plugins = ["support.controlplane.fixtures"]

# vLLM's anonymous usage reporting stays off in this process and every process the tests start.
os.environ.update(NO_USAGE_STATS_ENV)

# What every test in a folder needs, as the markers the Makefile selects on (`make test-fast` deselects
# slow, vllm and k8s). An engine takes tens of seconds to start, so every real-engine test is slow.
# `cpu_kernels` and `gpu_image` say something about one test, not its folder, and stay on the test.
FOLDER_MARKERS = {"vllm": ("vllm", "slow"), "containers": ("containers",)}
# A test that takes one of these fixtures starts a control plane: it is a `k8s` test and lives in tests/k8s.
# (That folder also holds, beside their real-API-server twins, fake-cluster tests that need no cluster:
# they stay in `make test-fast`, so the marker comes from the fixture there, not from the folder.)
CONTROL_PLANE_FIXTURES = ("control_plane", "real_node")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    misplaced = []
    for item in items:
        try:
            folder = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # a file outside tests/ named on the command line
            folder = ""
        for name in FOLDER_MARKERS.get(folder, ()):
            item.add_marker(name)
        if any(f in getattr(item, "fixturenames", ()) for f in CONTROL_PLANE_FIXTURES):
            item.add_marker(pytest.mark.k8s)
            if folder != "k8s":
                misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError(
            "these tests start the test control plane (control_plane or real_node) outside tests/k8s/: "
            "move their module there so the folder says what they need:\n  " + "\n  ".join(misplaced)
        )


@pytest.fixture(scope="session")
def random_models(tmp_path_factory) -> RandomModels:
    return build_random_models(tmp_path_factory.mktemp("random-models"))


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    try:
        return fetch_qwen3_tokenizer(cache_dir() / "qwen3-tokenizer")
    except Exception as err:  # a clear failure, never a skip
        pytest.fail(f"cannot get the real Qwen3 tokenizer: {err}", pytrace=False)
