"""Termination messages are stage output, not trusted input: the operator copies into the run's status only
fields of the type its schema gives them, drops the rest with a Warning event, and keeps patching the status.
Pure checks on pod dicts here; the same message through the real API server is
tests/k8s/test_operator_k8s.py::test_a_stage_message_of_wrong_types_leaves_the_run_patchable_and_flagged."""

from __future__ import annotations

import json
import math

import pytest

from opd_operator.observe import MESSAGE_FIELDS, check_message, termination


def pod_ending(code, message: str) -> dict:
    terminated = {"exitCode": code, "reason": "Completed", "finishedAt": "2026-12-02T03:00:00Z", "message": message}
    return {"metadata": {"name": "p"}, "status": {"containerStatuses": [{"state": {"terminated": terminated}}]}}


def test_fields_of_the_right_type_pass_and_others_are_ignored():
    msg = {"stage": "distill", "step": 200, "reverse_kl": 0.12, "checkpoint": "/w/final", "loss": 3, "scores": {}}
    kept, dropped = check_message(msg)
    assert kept == {"stage": "distill", "step": 200, "reverse_kl": 0.12, "checkpoint": "/w/final"}
    assert dropped == ()
    assert check_message({"step": 200.0, "eval_score": 1})[0] == {"step": 200, "eval_score": 1.0}


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("step", "400", "not a number"),
        ("step", True, "not a number"),
        ("step", 2.5, "not an integer"),
        ("reverse_kl", [0.1], "not a number"),
        ("eval_score", math.nan, "not a finite number"),
        ("eval_score", math.inf, "not a finite number"),
        ("checkpoint", 5, "not a string"),
        ("error", {"nested": 1}, "not a string"),
    ],
)
def test_a_field_of_the_wrong_type_is_dropped_and_named(field, value, why):
    kept, dropped = check_message({"stage": "sft", field: value})
    assert field not in kept and kept["stage"] == "sft"
    assert len(dropped) == 1 and dropped[0].startswith(f"{field}: {why}")


def test_termination_reads_nan_and_wrong_types_from_the_pods_message_without_passing_them_on():
    # Python's json accepts NaN, the API server's JSON does not: one NaN would fail every status patch
    term = termination(pod_ending(0, '{"stage": "eval", "eval_score": NaN, "step": "x", "checkpoint": "/w/f"}'))
    assert term is not None and term.exit_code == 0
    assert term.result == {"stage": "eval", "checkpoint": "/w/f"}
    assert {d.split(":")[0] for d in term.dropped} == {"eval_score", "step"}
    assert json.dumps(term.result, allow_nan=False)  # serialisable as the API server requires
    plain = termination(pod_ending(1, "Traceback ...\nRuntimeError: boom"))
    assert plain is not None and plain.result == {"error": "Traceback ...\nRuntimeError: boom"} and not plain.dropped
    assert set(MESSAGE_FIELDS) >= {"checkpoint", "step", "reverse_kl", "eval_score", "error"}
