"""The pure parts of multi-GPU and multi-node stages: the launcher prefix, which pod speaks for a gang,
and where a training rank's vLLM engine goes. The control-plane side is tests/k8s/test_multinode_k8s.py."""

from __future__ import annotations

import pytest

from opd_operator.observe import Termination, gang_termination
from opd_runtime.plan import launcher_argv, processes_per_pod
from opd_runtime.vllm_engine import rank_device_env


def test_launcher_prefix_for_one_and_many_nodes():
    assert launcher_argv(1) == ()
    assert launcher_argv(8)[3:] == ("--standalone", "--nproc-per-node=8", "--no-python")
    many = launcher_argv(1, nodes=3, master_addr="job-0.svc.ns.svc")
    assert many[:3] == ("python3", "-m", "opd_runtime.launch")
    assert many[3:] == (
        "--nnodes=3",
        "--nproc-per-node=1",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=job-0.svc.ns.svc",
        "--master-port=29500",
        "--no-python",
    )
    with pytest.raises(ValueError, match="master_addr"):
        launcher_argv(4, nodes=2)
    assert launcher_argv(0) == ()
    with pytest.raises(ValueError, match="at least one process"):
        launcher_argv(0, nodes=2, master_addr="job-0.svc.ns.svc")
    assert [processes_per_pod(g) for g in (0, 1, 8)] == [1, 1, 8]


def test_a_gang_speaks_through_its_first_failure_or_pod_0():
    ok0 = Termination(0, "Completed", "2026-12-02T03:00:05Z", {"stage": "sft", "step": 9})
    ok1 = Termination(0, "Completed", "2026-12-02T03:00:01Z", {})
    assert gang_termination([ok0, ok1]) is ok0  # rank 0 writes the result, whoever ends first
    killed = Termination(143, "Error", "2026-12-02T03:00:09Z", {"error": "SIGTERM"})
    cause = Termination(1, "Error", "2026-12-02T03:00:02Z", {"error": "CUDA out of memory"})
    assert gang_termination([killed, cause]) is cause  # the earlier failure; the kill followed it
    bad = Termination(2, "Error", "2026-12-02T03:00:07Z", {"error": "spec.sft.dataset.path: no such file"})
    assert gang_termination([cause, bad]) is bad  # do-not-retry wins over a retryable failure
    assert gang_termination([]) is None


def test_each_training_rank_gets_its_own_gpu_for_its_engine():
    assert rank_device_env({}) == {}  # one process: nothing changes
    assert rank_device_env({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}) == {}
    assert rank_device_env({"WORLD_SIZE": "8", "LOCAL_RANK": "3"})["CUDA_VISIBLE_DEVICES"] == "3"
    pinned = rank_device_env({"WORLD_SIZE": "4", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert pinned == {"CUDA_VISIBLE_DEVICES": "5", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    uuids = "GPU-aa, GPU-bb"
    assert rank_device_env({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": uuids}) == {
        "CUDA_VISIBLE_DEVICES": "GPU-bb",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    }
    with pytest.raises(RuntimeError, match="LOCAL_RANK 2 has no GPU of its own"):
        rank_device_env({"WORLD_SIZE": "4", "LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
