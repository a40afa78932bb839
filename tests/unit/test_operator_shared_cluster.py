"""The operator on a shared cluster, without a cluster: edits that change what a run needs, a spec that
turns invalid, children deleted behind the operator's back, leader election around writes.

Each test drives ``driver.reconcile_once`` against ``FakeApi`` (tests/support/opd_fake_cluster.py) as a story.
"""

from __future__ import annotations

import pytest

from opd_operator import driver

from support import opd_fake_cluster as fake
from support.opd_fake_cluster import T0, FakeApi, cond, tiny_run


class Story(fake.Story):
    def to_distill(self) -> None:
        super().to_distill()
        assert self.api.names("Job") == ["tiny-distill-1", "tiny-sft-1"]


# ---- an edit that takes the teacher out of the plan ----------------------------------------------------


def test_an_edit_that_drops_the_teacher_keeps_its_policy_while_it_serves_and_removes_it_after_distill():
    s = Story()
    s.to_distill()
    assert s.api.names("NetworkPolicy") == ["tiny-teacher"]
    s.api.edit_spec(teacher={"serving": {"url": "http://elsewhere:8000"}})  # no own teacher from now on
    s.reconcile()
    # distill keeps running with the previous spec and its teacher: the teacher stays closed to others
    assert cond(s.status, "SpecAccepted")["status"] == "False"
    assert s.api.names("Deployment") == ["tiny-teacher"]
    assert s.api.names("NetworkPolicy") == ["tiny-teacher"]
    s.api.finish_job("tiny-distill-1", 0, {"stage": "distill", "step": 200})
    s.reconcile()
    # distill is over and no stage needs this teacher: its GPUs are freed, then its policy goes too
    assert s.api.names("Deployment") == [] and s.api.names("Service") == []
    s.reconcile()
    assert s.api.names("NetworkPolicy") == []
    assert "teacher" not in s.status["stages"]


def test_objective_rl_while_queued_for_the_teacher_removes_the_teacher_at_once():
    s = Story()
    s.reconcile()
    s.api.finish_job("tiny-sft-1", 0, {"stage": "sft", "step": 400})
    s.reconcile()
    assert s.api.names("Deployment") == ["tiny-teacher"]  # distill waits for it
    s.api.edit_spec(distill={"objective": "rl"})
    s.reconcile()
    assert s.api.names("Deployment") == [] and s.api.names("Service") == []
    assert s.api.names("Job") == ["tiny-distill-1", "tiny-sft-1"]


# ---- the kopf the operator needs ------------------------------------------------------------------------


def test_the_kopf_floor_has_the_watch_label_selectors_the_operator_configures():
    """handlers.configure sets ``settings.watching.label_selectors`` (server-side selection of the children
    it watches): kopf 1.44.6 has no such setting (its kopf/_cogs/configs/configuration.py lacks it; 1.45.0
    has it), so an operator installed at an older floor fails at startup."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    from support.opd_fake_cluster import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (kopf,) = [Requirement(r) for r in extras["operator"] if Requirement(r).name == "kopf"]
    (floor,) = [Version(s.version) for s in kopf.specifier if s.operator == ">="]
    assert floor >= Version("1.45"), f"pyproject: kopf>={floor}, but the operator uses kopf 1.45's API"


# ---- an edit into an invalid spec -----------------------------------------------------------------------


def test_a_run_edited_into_an_invalid_spec_stops_its_jobs_and_teacher_and_resumes_once_fixed():
    s = Story()
    s.to_distill()
    s.api.edit_spec(distill={"steps": -1})
    d = s.reconcile()
    assert s.status["phase"] == "Failed" and cond(s.status, "Ready")["reason"] == "InvalidSpec"
    # Failed means nothing runs: no GPUs held for a run that cannot go on
    assert s.api.names("Job") == ["tiny-sft-1"]
    assert s.api.names("Deployment") == [] and s.api.names("Service") == []
    assert s.status["stages"]["distill"]["phase"] == "Pending"
    assert "spec.distill.steps" in s.status["message"]
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    s.api.edit_spec(distill={"steps": 200})
    s.reconcile()
    assert s.status["phase"] == "Running" and s.api.names("Deployment") == ["tiny-teacher"]
    s.api.make_available("tiny-teacher")
    s.reconcile()
    assert s.api.names("Job") == ["tiny-distill-2", "tiny-sft-1"]  # from its last checkpoint (--resume)
    assert s.status["stages"]["distill"]["failures"] == 0  # the stop was no failure of the stage


# ---- a Job deleted behind the operator's back ------------------------------------------------------------


def test_a_stage_job_deleted_by_someone_else_counts_as_a_failure_with_back_off_and_retries():
    s = Story(retries=1, backoffSeconds=30)
    s.reconcile()
    s.api.delete("Job", "ns", "tiny-sft-1")
    d = s.reconcile()
    sft = s.status["stages"]["sft"]
    assert s.api.names("Job") == []  # not re-created at once
    assert sft["failures"] == 1 and sft["phase"] == "Retrying"
    assert "tiny-sft-1 was deleted" in sft["message"]
    assert "JobDeleted" in [e.reason for e in d.events]
    s.reconcile(seconds=10)
    assert s.api.names("Job") == []  # the back-off holds
    s.reconcile(seconds=25)
    assert s.api.names("Job") == ["tiny-sft-2"]
    s.api.delete("Job", "ns", "tiny-sft-2")
    s.reconcile()
    assert s.api.names("Job") == []
    assert s.status["phase"] == "Failed" and s.status["stages"]["sft"]["reason"] == "RetriesExhausted"
    s.reconcile(seconds=3600)
    assert s.api.names("Job") == []  # bounded: no third attempt


def test_the_operators_own_job_deletions_count_no_failure():
    s = Story(retries=0)
    s.reconcile()
    s.api.edit_spec(suspend=True)
    s.reconcile()
    assert s.api.names("Job") == []
    s.api.edit_spec(suspend=False)
    s.reconcile()
    assert s.api.names("Job") == ["tiny-sft-2"] and s.status["stages"]["sft"]["failures"] == 0


# ---- leader election around each write ------------------------------------------------------------------


class SlowApi(FakeApi):
    """Each create takes ``seconds`` of the leader's clock (a slow API server): the elector's last renewal
    recedes by that much, as it would while the renew thread's requests hang too."""

    def __init__(self, elector, seconds: float):
        super().__init__()
        self.elector, self.seconds, self.timeout = elector, seconds, elector.write_timeout()

    def create(self, namespace, body):
        self.elector._renewed_at -= self.seconds
        return super().create(namespace, body)


def test_with_leader_election_every_write_is_checked_not_only_the_first():
    import time

    from opd_operator import leader

    exits = []

    def lost():
        exits.append(leader.EXIT_LOST)
        raise SystemExit(leader.EXIT_LOST)

    elector = leader.LeaderElector(leader.LeaseSettings(namespace="ns"), api=object(), on_lost=lost)
    elector._renewed_at = time.monotonic()
    leader.set_current(elector)
    try:
        api = SlowApi(elector, seconds=4.5)
        api.add_run(tiny_run())
        with pytest.raises(SystemExit):
            driver.reconcile_once(api, "ns", "tiny", now=T0)
    finally:
        leader.set_current(None)
    # the first round would create 6 objects; after two slow creates (9 s since the renewal: still within
    # the 10 s renew deadline) a third, which may take write_timeout (6.5 s), could land after the 15 s
    # Lease passed to another: the operator stops before it
    assert exits == [leader.EXIT_LOST]
    assert [c for c in api.calls if c[0] == "create"] == [
        ("create", "ServiceAccount", "tiny-stage"),
        ("create", "Role", "tiny-stage"),
    ]


def test_a_write_that_could_outlive_the_lease_is_not_started():
    import time

    from opd_operator import leader

    elector = leader.LeaderElector(leader.LeaseSettings(namespace="ns"), api=object())
    elector._renewed_at = time.monotonic() - 3.0
    assert elector.leading(request_seconds=elector.write_timeout())
    assert not elector.leading(request_seconds=30.0)  # the client's default timeout: longer than the Lease
    elector._renewed_at = time.monotonic() - 9.0  # within renew_deadline (10 s), but 9 + 6.5 > 15
    assert not elector.leading(request_seconds=elector.write_timeout())


# ---- spec.managedBy: two installs never both act on one run -----------------------------------------------


def test_an_operator_acts_only_on_runs_whose_managed_by_names_it():
    api = FakeApi()
    api.add_run(tiny_run("mine", managedBy="example.com/team-a"))
    api.add_run(tiny_run("default"))
    assert driver.reconcile_once(api, "ns", "mine", now=T0, controller="example.com/team-b") is None
    assert driver.reconcile_once(api, "ns", "default", now=T0, controller="example.com/team-b") is None
    assert driver.reconcile_once(api, "ns", "mine", now=T0) is None  # the default operator leaves it alone too
    assert api.calls == [] and "status" not in api.run(name="mine") and "status" not in api.run(name="default")
    assert driver.reconcile_once(api, "ns", "mine", now=T0, controller="example.com/team-a") is not None
    assert driver.reconcile_once(api, "ns", "default", now=T0) is not None
    assert api.names("Job") == ["default-sft-1", "mine-sft-1"]


def test_kopf_starts_no_daemon_and_so_puts_no_finalizer_on_another_controllers_run():
    import kopf

    from opd_operator import handlers

    registry = kopf.get_default_registry()
    (daemon,) = registry._spawning.get_all_handlers()
    assert daemon.when is handlers.active
    assert handlers.active(body=tiny_run()) and not handlers.active(body=tiny_run(managedBy="example.com/other"))


def test_a_finished_run_keeps_no_daemon_until_its_spec_is_edited():
    from opd_operator import handlers

    run = {**tiny_run(), "status": {"phase": "Succeeded", "observedGeneration": 3}}
    run["metadata"] = {**run["metadata"], "generation": 3}
    assert not handlers.active(body=run)
    assert not handlers.active(body={**run, "status": {"phase": "Failed", "observedGeneration": 3}})
    edited = {**run, "metadata": {**run["metadata"], "generation": 4}}  # the finished status is for spec 3
    assert handlers.active(body=edited)
    assert handlers.active(body={**run, "status": {"phase": "Running", "observedGeneration": 3}})


def test_managed_by_is_not_part_of_what_stages_compute():
    from opd_operator import children
    from opd_runtime.spec import parse_run

    assert children.spec_hash(parse_run(tiny_run())) == children.spec_hash(
        parse_run(tiny_run(managedBy="example.com/team-a"))
    )


# ---- upgrades: new defaulted fields, unknown fields ------------------------------------------------------


def test_the_spec_hash_ignores_a_field_a_newer_release_adds_with_a_default():
    from pydantic import Field, create_model

    from opd_operator import children
    from opd_runtime.spec import DistillationRunSpec, parse_run
    from opd_runtime.spec.stages import SftSpec

    run = parse_run(tiny_run())
    # the next release's models: one more defaulted field in spec.sft
    new_sft = create_model("SftSpec", __base__=SftSpec, future_option=(bool, Field(False, description="new")))
    new_spec = create_model("DistillationRunSpec", __base__=DistillationRunSpec, sft=(new_sft | None, None))
    wire = run.spec.to_wire()
    upgraded = run.model_copy(update={"spec": new_spec.model_validate(wire)})
    assert upgraded.spec.to_wire()["sft"]["futureOption"] is False
    assert children.spec_hash(upgraded) == children.spec_hash(run)  # no running stage or teacher restarts


def test_children_started_under_the_previous_digest_keep_running_after_the_upgrade():
    from opd_operator import children
    from opd_runtime.spec import parse_run

    s = Story()
    s.to_distill()
    legacy = children._digest(children.stage_spec(parse_run(s.api.run())))
    for kind, name in (("Job", "tiny-distill-1"), ("Deployment", "tiny-teacher")):
        s.api.objects[(kind, "ns", name)]["metadata"]["annotations"][children.names.SPEC_HASH_ANNOTATION] = legacy
    d = s.reconcile()
    assert cond(s.status, "SpecAccepted")["status"] == "True"
    assert [a.verb for a in d.actions if a.kind in ("Job", "Deployment")] == []


def test_fields_of_a_newer_crd_are_ignored_not_a_failure():
    s = Story()
    s.api.run()["spec"]["sft"]["futureOption"] = True  # a field this operator's models do not know
    s.api.run()["spec"]["pod"] = {"env": [{"name": "A", "value": "1", "fromNewerRelease": {"x": 1}}]}
    s.reconcile()
    assert s.status["phase"] == "Running" and s.api.names("Job") == ["tiny-sft-1"]


@pytest.mark.parametrize("example", ["tiny-math.yaml", "tiny-math-rl.yaml", "qwen3-1.7b-aime.yaml"])
def test_no_field_of_a_valid_spec_is_taken_for_a_newer_crds(example):
    """Every key validation accepts is known, in camelCase and by field name: an alias the generator makes
    (pydantic leaves some of them off FieldInfo.alias, e.g. teacher.serving.modelCache) is no unknown field."""
    from pathlib import Path

    import yaml

    from opd_operator.reconcile import unknown_fields
    from opd_runtime.spec.run import DistillationRunSpec

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / example).read_text())
    spec = doc["spec"]
    spec.setdefault("teacher", {}).setdefault("serving", {})["modelCache"] = {"accessModes": ["ReadWriteOnce"]}
    assert unknown_fields(spec, DistillationRunSpec, "spec") == []
    assert "modelCache" in spec["teacher"]["serving"]


# ---- pass-through to stage and teacher pods --------------------------------------------------------------


def test_labels_annotations_scheduler_and_gpu_resource_reach_stage_and_teacher_pods():
    from opd_operator import children, names
    from opd_runtime.spec import parse_run

    obj = tiny_run(
        pod={
            "labels": {"kueue.x-k8s.io/priority-class": "high", names.RUN_LABEL: "not-this"},
            "annotations": {"sidecar.istio.io/inject": "false"},
            "schedulerName": "volcano",
            "gpuResourceName": "nvidia.com/mig-1g.10gb",
        },
        sft={**tiny_run()["spec"]["sft"], "resources": {"gpus": 1}, "pod": {"labels": {"team": "a"}}},
    )
    run = parse_run(obj)
    job = children.stage_job(obj, run, "sft", 1)["spec"]["template"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["metadata"]["labels"]["team"] == "a"
    assert job["metadata"]["labels"][names.RUN_LABEL] == "tiny"  # the operator's own labels win
    assert job["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert job["spec"]["schedulerName"] == "volcano"
    (container,) = job["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/mig-1g.10gb": "1"}
    assert job["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    teacher = children.teacher_deployment(obj, run)["spec"]["template"]
    assert teacher["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert names.SPEC_HASH_ANNOTATION in teacher["metadata"]["annotations"]
    assert "team" not in teacher["metadata"]["labels"] and teacher["spec"]["schedulerName"] == "volcano"


def test_gpus_default_to_nvidia():
    from opd_operator import children
    from opd_runtime.spec import parse_run

    obj = tiny_run(sft={**tiny_run()["spec"]["sft"], "resources": {"gpus": 2}})
    (container,) = children.stage_job(obj, parse_run(obj), "sft", 1)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
