"""Checkpoints survive a crash at any point of their publication, and are never resumed by a spec other than
the one they were written for (a run re-created over a retained workspace)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
import yaml

from opd_runtime import cli, fingerprint, modeling
from opd_runtime.contract import EXIT_BAD_CONFIG, EXIT_OK
from opd_runtime.spec import SpecError, load_run, parse_run
from opd_runtime.training import checkpoint

from support.runs import run_doc


def fake_checkpoint(path: Path, tag: str) -> Path:
    """A complete checkpoint as far as ``latest()`` and resuming are concerned, tagged to tell it apart."""
    (path / "model").mkdir(parents=True)
    (path / "model" / "tag").write_text(tag)
    (path / checkpoint.STATE_FILE).write_bytes(b"state")
    return path


def tag_of(path: Path | None) -> str | None:
    return None if path is None else (path / "model" / "tag").read_text()


@pytest.mark.parametrize("latest_names_the_rewritten_step", [True, False])
def test_a_crash_anywhere_while_rewriting_a_step_leaves_a_complete_latest(tmp_path, latest_names_the_rewritten_step):
    """An attempt that reaches a step an earlier attempt already wrote replaces it; stopped after any of the
    filesystem operations (a crash), `latest()` is the old checkpoint or the new one, never nothing."""
    n_ops = len(list(_rewrite(tmp_path / "probe", latest_names_the_rewritten_step)))
    assert n_ops == 4  # set aside, rename, switch latest, delete
    for crash_after in range(n_ops + 1):
        root = tmp_path / f"crash-{crash_after}"
        steps = _rewrite(root, latest_names_the_rewritten_step)
        for _ in range(crash_after):
            next(steps)
        steps.close()  # nothing after this point runs, as when the process dies
        found = checkpoint.latest(root)
        before = "old" if latest_names_the_rewritten_step else "previous"
        # a complete checkpoint at every point: the one `latest` named before, or the new one (by the third
        # operation `latest` names it)
        assert tag_of(found) in ({before, "new"} if crash_after < 3 else {"new"}), (crash_after, found)
        if crash_after == n_ops:
            assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000010", "step-000020"]


def _rewrite(root: Path, latest_names_it: bool):
    """The publication of a new step-000020 over an earlier one, as ``publish_steps`` does it."""
    fake_checkpoint(root / "step-000010", "previous")
    fake_checkpoint(root / "step-000020", "old")
    checkpoint.write_atomic_text(root / checkpoint.LATEST, ("step-000020" if latest_names_it else "step-000010") + "\n")
    tmp = fake_checkpoint(root / f".step-000020.tmp-{os.getpid()}", "new")
    return checkpoint.publish_steps(root, tmp, root / "step-000020")


def test_a_set_aside_checkpoint_is_pruned_once_latest_names_a_complete_one(tmp_path):
    root = tmp_path / "ckpt"
    fake_checkpoint(root / "step-000020", "new")
    fake_checkpoint(root / ".step-000020.old-1", "old")  # a crashed writer's
    checkpoint.write_atomic_text(root / checkpoint.LATEST, "step-000020\n")
    tmp = fake_checkpoint(root / f".step-000030.tmp-{os.getpid()}", "next")
    checkpoint._publish(root, tmp, root / "step-000030", keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000030"]
    assert tag_of(checkpoint.latest(root)) == "next"


def test_pruning_never_deletes_latest_even_below_an_abandoned_later_step(tmp_path):
    root = tmp_path / "ckpt"
    fake_checkpoint(root / "step-000060", "abandoned")  # renamed in, then the writer died before `latest`
    tmp = fake_checkpoint(root / f".step-000040.tmp-{os.getpid()}", "resumed")
    checkpoint._publish(root, tmp, root / "step-000040", keep=1)
    assert tag_of(checkpoint.latest(root)) == "resumed"


def test_real_save_at_a_step_already_written_replaces_it(random_models, tmp_path):
    model = modeling.load_causal_lm(str(random_models.student), dtype="float32")
    tokenizer = modeling.load_tokenizer(str(random_models.student))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    root = tmp_path / "ckpt"
    kw = dict(model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, keep=2)
    checkpoint.save(root, 1, extra={"data_position": 1}, **kw)
    checkpoint.save(root, 1, extra={"data_position": 2}, **kw)  # a later attempt reaches step 1 again
    found = checkpoint.latest(root)
    assert found == root / "step-000001" and checkpoint.load_state(found)["data_position"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]


# ---- the spec a checkpoint was written for -----------------------------------------------------------------


def spec(**distill) -> dict:
    return run_doc("student-dir", "teacher-dir", **distill)


def test_resuming_checkpoints_of_another_spec_names_each_differing_field(tmp_path):
    root = tmp_path / "checkpoints" / "distill"
    first = parse_run(spec())
    assert checkpoint.resumable(root, False, first, "distill") is None  # fresh: records the fingerprint
    fake_checkpoint(root / "step-000002", "x")
    checkpoint.write_atomic_text(root / checkpoint.LATEST, "step-000002\n")

    other = parse_run(spec(promptsPerStep=4, lora={"enabled": True, "rank": 8}))
    with pytest.raises(SpecError) as err:
        checkpoint.resumable(root, True, other, "distill")
    msg = str(err.value)
    assert msg.startswith("spec.distill:") and str(root) in msg
    for field in ("spec.distill.promptsPerStep", "spec.distill.lora.enabled", "spec.distill.lora.rank"):
        assert field in msg
    assert "spec.distill.steps" not in msg and "delete" in msg and "new workspace" in msg

    # fields that do not change what a step means may change: train longer, another rate, other cadence
    same_meaning = parse_run(
        spec(steps=50, microBatchSize=1, optimizer={"learningRate": 1e-4}, checkpointing={"every": 5, "keep": 1})
    )
    assert checkpoint.resumable(root, True, same_meaning, "distill") == root / "step-000002"


def test_sft_fingerprint_covers_its_data_batch_and_adapter_but_not_its_schedule():
    doc = spec()
    doc["spec"]["sft"] = {"dataset": {"name": "tinymath"}, "batchSize": 8, "steps": 10}
    values = fingerprint.shaping_values(parse_run(doc), "sft")
    assert values["spec.sft.dataset.name"] == "tinymath" and values["spec.sft.batchSize"] == 8
    assert values["spec.sft.lora.enabled"] is False and values["spec.student.model"] == "student-dir"
    assert not any(k.startswith(("spec.sft.steps", "spec.sft.optimizer", "spec.sft.checkpointing")) for k in values)


def test_fingerprint_fields_the_record_predates_are_not_compared(tmp_path):
    root = tmp_path / "ckpt"
    fake_checkpoint(root / "step-000001", "x")
    checkpoint.write_atomic_text(root / checkpoint.LATEST, "step-000001\n")
    values = fingerprint.shaping_values(parse_run(spec()), "distill")
    older = {k: v for k, v in values.items() if not k.startswith("spec.distill.prompts.")}
    fingerprint.record(root, older)
    fingerprint.check(root, "distill", values)  # no error: the record knew no prompts fields
    assert "spec.distill.prompts.name" in values and "spec.teacher.model" in values


def test_opd_distill_refuses_with_exit_2_over_a_workspace_of_another_spec(random_models, tmp_path):
    """The retained-PVC case end to end: the stage command on a workspace holding another spec's checkpoints."""
    ws = tmp_path / "ws"
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(run_doc(random_models.student, random_models.teacher, steps=1), sort_keys=False))
    assert opd("distill", "--config", str(first), "--workspace", str(ws), "--resume")[0] == EXIT_OK

    second = tmp_path / "second.yaml"
    doc = run_doc(random_models.student, random_models.teacher, steps=2, samplesPerPrompt=3)
    second.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out, err = opd("distill", "--config", str(second), "--workspace", str(ws), "--resume")
    assert code == EXIT_BAD_CONFIG, out + err
    assert "spec.distill.samplesPerPrompt: 2 then, 3 now" in err


def opd(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_opd_run_resume_refuses_a_finished_stage_of_another_spec_before_running_anything(tmp_path):
    from opd_runtime.runner import RunOptions, run_all

    def run_file(name: str, batch: int) -> Path:
        doc = spec()
        doc["spec"]["sft"] = {"dataset": {"name": "tinymath"}, "batchSize": batch, "microBatchSize": 1}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "results" / "sft.json").write_text("{}")  # sft finished under batchSize 8
    fingerprint.record(work / "checkpoints" / "sft", fingerprint.shaping_values(load_run(run_file("a.yaml", 8)), "sft"))
    with pytest.raises(SpecError) as err:
        run_all(RunOptions(run_file("b.yaml", 16), work, resume=True, teacher="local", progress=False), log=print)
    # refused as a configuration error, not a stage failure (StageFailed): nothing was started
    assert "spec.sft.batchSize: 8 then, 16 now" in str(err.value)
