"""The operator on a shared cluster, on the real control plane: spec.managedBy keeps an operator off
another controller's runs, and a run whose operator is gone is deleted by removing its finalizer the way
docs/operator/shared-cluster.md says (its children then go with it)."""

from __future__ import annotations

import shlex
from pathlib import Path

from opd_operator import names

from support.controlplane import ControlPlane
from support.operator_harness import Operator, Run, exists, tiny_math

DOC = Path(__file__).resolve().parents[2] / "docs" / "operator" / "shared-cluster.md"


def documented_command(marker: str) -> list[str]:
    """The shell command of the doc's code line that contains ``marker``."""
    line = next(li.strip() for li in DOC.read_text().splitlines() if marker in li and li.strip().startswith("kubectl"))
    return shlex.split(line)


def test_another_controllers_run_is_left_alone_and_a_run_outliving_its_operator_is_deleted_by_the_documented_patch(
    cp: ControlPlane, k8s_namespace: str, operator_kubeconfig: Path, tmp_path: Path
):
    ns = k8s_namespace
    op = Operator(cp, operator_kubeconfig, ns, tmp_path)
    op.start()
    try:
        ours = Run(cp, ns, tiny_math("ours"))
        theirs = Run(cp, ns, tiny_math("theirs", managedBy="example.com/other-install"))
        ours.wait("the sft Job", lambda st: st.get("stage") == "sft")
        config_map = f"/api/v1/namespaces/{ns}/configmaps/ours-spec"
        assert exists(cp, config_map)
        assert names.FINALIZER in ours.obj()["metadata"].get("finalizers", [])
        # the other controller's run: no finalizer, no status, no children
        assert "finalizers" not in theirs.obj()["metadata"] and theirs.status() == {}
        assert not exists(cp, f"/api/v1/namespaces/{ns}/configmaps/theirs-spec")
    finally:
        op.stop()
    # the operator is gone: deleting the run waits on its finalizer
    cp.kubectl("delete", "distillationrun", "ours", "-n", ns, "--wait=false")
    assert ours.obj()["metadata"].get("deletionTimestamp")
    cmd = [{"RUN": "ours", "NAMESPACE": ns}.get(a, a) for a in documented_command("finalizers")[1:]]
    cp.kubectl(*cmd)
    cp.wait("the run to be gone", lambda: not exists(cp, ours.path), timeout=30)
    cp.wait("its children to be collected", lambda: not exists(cp, config_map), timeout=60)
