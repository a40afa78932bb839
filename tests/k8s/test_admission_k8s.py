"""Admission parity: every spec of the invalid-spec corpus (tests/support/invalid_specs.py) is refused by the spec
models (`opd validate`) and by the real API server at ``kubectl apply`` (the CRD's CEL rules), both naming
the same field."""

from __future__ import annotations

import re

import pytest

from opd_runtime.spec import SpecError, parse_run

from support.controlplane import ControlPlane
from support.invalid_specs import CASES, Case, invalid_run
from support.operator_harness import CRD_FILE


def dotted(path: str) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_opd_validate_refuses_each_invalid_spec_naming_its_field(case: Case):
    with pytest.raises(SpecError) as err:
        parse_run(invalid_run(case))
    fields = re.findall(r"^(spec[\w.]*): ", str(err.value), flags=re.M)
    assert fields == [case.field], str(err.value)


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> ControlPlane:
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    control_plane.wait_established("distillationruns.opd.dev")
    return control_plane


def test_the_api_server_refuses_each_invalid_spec_at_apply_naming_the_same_field(crd: ControlPlane, k8s_namespace):
    refused = {}
    for case in CASES:
        proc = crd.kubectl(
            "apply", "--dry-run=server", "-n", k8s_namespace, "-f", "-", input=yaml_of(invalid_run(case)), check=False
        )
        fields = {dotted(f) for f in re.findall(r"(spec[\w.\[\]]*): Invalid value", proc.stderr)}
        refused[case.id] = (proc.returncode, sorted(fields), proc.stderr.strip()[-300:])
    wrong = {c.id: refused[c.id] for c in CASES if refused[c.id][0] == 0 or refused[c.id][1] != [c.field]}
    assert not wrong, wrong


def yaml_of(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc)
