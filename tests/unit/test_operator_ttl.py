"""spec.ttlSecondsAfterFinished (operator/ttl.py): a finished run's children are deleted once the TTL has
passed since status.completionTime; the run and its status stay; the workspace PVC goes only with
retentionPolicy Delete. Pure: a FakeApi at a controllable clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from opd_operator import driver, ttl

from support.opd_fake_cluster import Story

CHILDREN = ("Job", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Service", "Deployment", "Pod")


def succeeded(**spec: Any) -> Story:
    """A tiny run played to Succeeded (sft, teacher, distill, eval)."""
    s = Story(**spec)
    s.to_distill()
    s.api.finish_job("tiny-distill-1", 0, {"stage": "distill", "step": 200, "checkpoint": "/workspace/d/final"})
    s.reconcile()
    s.api.finish_job("tiny-eval-1", 0, {"stage": "eval", "eval_score": 0.41})
    s.reconcile()
    assert s.status["phase"] == "Succeeded" and ttl.settled(s.api.run())
    return s


def reconcile_at(s: Story, seconds: float, default_ttl: int | None = None):
    s.now += timedelta(seconds=seconds)
    return driver.reconcile_once(s.api, "ns", "tiny", now=s.now, default_ttl=default_ttl)


def test_children_stay_until_the_ttl_passes_then_go_and_the_status_stays():
    s = succeeded(ttlSecondsAfterFinished=600)
    finished = s.status["completionTime"]
    assert ttl.pending(s.api.run(), None) == s.now.replace(microsecond=0) + timedelta(seconds=600)
    d = reconcile_at(s, 300)
    assert not d.actions and s.api.names("Job") and "childrenDeletedTime" not in s.status
    d = reconcile_at(s, 301)
    assert [e.reason for e in d.events] == ["ChildrenDeleted"]
    for kind in CHILDREN:
        assert s.api.names(kind) == [], kind
    assert s.api.names("PersistentVolumeClaim") == ["tiny-workspace"]  # Retain: the checkpoints stay
    assert "the workspace PVC tiny-workspace is kept" in d.events[0].message
    st = s.status
    assert st["phase"] == "Succeeded" and st["evalScore"] == 0.41 and st["completionTime"] == finished
    assert st["childrenDeletedTime"] and ttl.pending(s.api.run(), None) is None
    # another round of a settled, expired run re-creates nothing and says nothing again
    d = reconcile_at(s, 60)
    assert not d.actions and not d.events and s.api.names("ConfigMap") == []


def test_the_workspace_goes_with_retention_delete():
    s = succeeded(ttlSecondsAfterFinished=0, workspace={"retentionPolicy": "Delete"})
    reconcile_at(s, 1)
    assert s.api.names("PersistentVolumeClaim") == [] and s.api.names("Job") == []


def test_the_operator_default_applies_to_runs_that_set_none_and_the_spec_wins():
    s = succeeded()
    assert ttl.pending(s.api.run(), None) is None
    reconcile_at(s, 3600)
    assert s.api.names("Job"), "no TTL anywhere: the children are kept"
    reconcile_at(s, 1, default_ttl=60)
    assert s.api.names("Job") == []
    kept = succeeded(ttlSecondsAfterFinished=86400)
    reconcile_at(kept, 3600, default_ttl=60)
    assert kept.api.names("Job"), "the run's own TTL overrides the operator's default"


def test_an_edit_after_the_ttl_reconciles_the_run_again():
    s = succeeded(ttlSecondsAfterFinished=0)
    reconcile_at(s, 1)
    assert s.api.names("ConfigMap") == []
    s.api.edit_spec(retries=3)
    assert not ttl.settled(s.api.run())
    reconcile_at(s, 1)
    assert s.api.names("ConfigMap") == ["tiny-spec"]  # the edited spec is reconciled, plumbing and all
    assert s.status["phase"] == "Succeeded" and "childrenDeletedTime" not in s.status
    assert ttl.pending(s.api.run(), None) is not None, "finished again: its TTL is due again"
