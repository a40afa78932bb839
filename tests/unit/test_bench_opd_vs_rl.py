"""bench/opd_vs_rl.py's own code on tiny inputs: the compute ratio, the curves from per-step metrics, the
tables, the settings (--quick) and the run files it writes. No training here: the bench's measurement is
run by hand (`--quick` for a smoke test) and its tables go on a dated page of docs/results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from opd_runtime.spec import parse_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("opd_vs_rl", ROOT / "bench" / "opd_vs_rl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def curve(bench, method: str, points: list[tuple[int, float, float]]):
    """A Curve from (step, GFLOP, accuracy) points."""
    c = bench.Curve(method, step_seconds=1.5)
    c.points = [{"step": s, "flops": g * 1e9, "seconds": float(s), "accuracy": a} for s, g, a in points]
    return c


def test_ratio_is_rl_compute_to_its_best_over_opd_compute_to_the_same_accuracy(bench):
    opd = curve(bench, "opd", [(0, 0, 0.60), (10, 100, 0.72), (20, 200, 0.80)])
    rl = curve(bench, "rl", [(0, 0, 0.60), (10, 80, 0.65), (20, 160, 0.70), (30, 240, 0.70)])
    ratio = bench.compute_ratio(opd, rl)
    # RL first reaches its best (70%) at 160 GFLOP, OPD first reaches >= 70% at 100 GFLOP
    assert (ratio["rl_best_accuracy"], ratio["rl_step"], ratio["opd_step"]) == (0.70, 20, 10)
    assert ratio["ratio"] == pytest.approx(1.6) and ratio["text"] == "1.6x"


def test_ratio_says_why_there_is_none(bench):
    rl = curve(bench, "rl", [(0, 0, 0.60), (10, 80, 0.70)])
    behind = curve(bench, "opd", [(0, 0, 0.60), (10, 100, 0.68)])
    assert bench.compute_ratio(behind, rl)["text"].startswith("not reached")
    flat_rl = curve(bench, "rl", [(0, 0, 0.60), (10, 80, 0.55)])
    assert bench.compute_ratio(behind, flat_rl)["text"] == "RL never improved on the start: no ratio"


def test_curve_accumulates_flops_and_seconds_up_to_each_evaluated_step(bench):
    lines = [{"step": s, "completion_tokens": 10 * s, "step_seconds": 0.5 * s} for s in (1, 2, 3, 4)]
    prompt_tokens = [100, 100, 100, 100]
    asked: list[int] = []

    def accuracy_at(step: int) -> float:
        asked.append(step)
        return step / 10

    c = bench.curve_from_steps("rl", lines, prompt_tokens, 2.0, range(2, 5, 2), 0.25, accuracy_at)
    assert asked == [2, 4]
    # tokens 110, 120, 130, 140 at 2 FLOPs each: 460 after step 2, 1,000 after step 4
    assert c.points == [
        {"step": 0, "flops": 0.0, "seconds": 0.0, "accuracy": 0.25},
        {"step": 2, "flops": 460.0, "seconds": 1.5, "accuracy": 0.2},
        {"step": 4, "flops": 1000.0, "seconds": 5.0, "accuracy": 0.4},
    ]
    assert c.step_seconds == pytest.approx(5.0 / 4)
    with pytest.raises(ValueError):  # metrics of another length than the steps' prompts: not silently cut
        bench.curve_from_steps("rl", lines[:3], prompt_tokens, 2.0, range(2, 3), 0.25, accuracy_at)


def test_tables_name_the_start_then_list_points_gains_and_the_ratio(bench):
    opd = curve(bench, "opd", [(0, 0, 0.625), (20, 785, 0.71)])
    rl = curve(bench, "rl", [(0, 0, 0.625), (20, 576.4, 0.685)])
    opd.last10 = {"reverse_kl": 0.110}
    text = bench.tables([opd, rl], bench.compute_ratio(opd, rl), "the demo's SFT checkpoint X, held-out 62.5%")
    lines = text.splitlines()
    assert lines[0] == "Start (every method): the demo's SFT checkpoint X, held-out 62.5%"
    assert "| opd | 20 | 785.0 | 20 | 71.0% |" in lines and "| rl | 20 | 576.4 | 20 | 68.5% |" in lines
    assert "| opd | 1.50 | 62.5% -> 71.0% (+8.5%) | last 10 steps: batch reverse KL 0.110 |" in lines
    assert lines[-1].startswith("RL's best: 68.5% at step 20 (576.4 GFLOP)") and lines[-1].endswith(": 0.7x")


def test_seeds_are_averaged_per_step_and_each_seed_is_shown(bench):
    seeds = [
        curve(bench, "opd", [(0, 0, 0.625), (20, 780, 0.70)]),
        curve(bench, "opd", [(0, 0, 0.625), (20, 790, 0.74)]),
        curve(bench, "opd", [(0, 0, 0.625), (20, 800, 0.72)]),
    ]
    for c, kl in zip(seeds, (0.1, 0.2, 0.3), strict=True):
        c.last10 = {"reverse_kl": kl}
    mean = bench.mean_curve(seeds)
    assert [p["step"] for p in mean.points] == [0, 20]
    end = mean.points[-1]
    assert end["flops"] == pytest.approx(790e9) and end["accuracy"] == pytest.approx(0.72)
    assert end["accuracies"] == [0.70, 0.74, 0.72] and mean.last10 == {"reverse_kl": pytest.approx(0.2)}
    # mean, sample standard deviation (2.0 points) and every seed, in --seeds order
    assert bench.accuracy_text(end) == "72.0% ± 2.0 (70.0 / 74.0 / 72.0)"
    assert bench.accuracy_text(bench.mean_curve(seeds[:1]).points[-1]) == "70.0%"
    rl = bench.mean_curve([curve(bench, "rl", [(0, 0, 0.625), (20, 576, 0.68)])] * 3)
    text = bench.tables([mean, rl], bench.compute_ratio(mean, rl), "X", ["seed 0 1.0x", "seed 1 0.7x", "seed 2 0.7x"])
    assert "| opd | 20 | 790.0 | 20 | 72.0% ± 2.0 (70.0 / 74.0 / 72.0) |" in text.splitlines()
    assert (
        "| opd | 1.50 | 62.5% -> 72.0% ± 2.0 (70.0 / 74.0 / 72.0) (+9.5%) | last 10 steps: batch reverse KL 0.200 |"
        in text
    )
    assert text.splitlines()[-1] == "The same ratio of each seed's own curves: seed 0 1.0x, seed 1 0.7x, seed 2 0.7x"
    with pytest.raises(ValueError):  # seeds evaluated at other steps cannot be averaged
        bench.mean_curve([seeds[0], curve(bench, "opd", [(0, 0, 0.625), (10, 400, 0.7)])])


def test_opd_can_take_its_own_batch_shape(bench):
    args = bench.parse_args(["--opd-prompts", "128", "--opd-samples", "1", "--methods", "opd", "trl-distill"])
    assert bench.opd_name(args) == "opd-128x1" and args.methods == ["opd", "trl-distill"]
    d = parse_run(yaml.safe_load(bench.run_yaml(args, "distill", Path("/s"), Path("/t"), 1e-4))).spec.distill
    assert (d.prompts_per_step, d.samples_per_prompt, d.micro_batch_size) == (128, 1, 128)
    r = parse_run(yaml.safe_load(bench.run_yaml(args, "rl", Path("/s"), Path("/t"), 1e-4))).spec.distill
    assert (r.prompts_per_step, r.samples_per_prompt) == (32, 4)  # RL keeps its groups
    assert bench.opd_name(bench.parse_args([])) == "opd"


def test_quick_settings_fill_only_what_is_not_given(bench):
    quick = bench.parse_args(["--quick", "--steps", "6"])
    assert (quick.steps, quick.prompts, quick.samples, quick.eval_every, quick.heldout) == (6, 4, 2, 2, 20)
    assert quick.sft_steps == 20 and quick.out == Path("runs/opd-vs-rl-quick")
    full = bench.parse_args([])
    assert (full.steps, full.prompts, full.samples, full.sft_steps, full.out) == (
        60,
        32,
        4,
        None,
        Path("runs/opd-vs-rl"),
    )
    assert full.seeds == [0] and full.methods == ["opd", "rl", "trl-grpo", "trl-distill"]
    assert bench.parse_args(["--no-trl", "--seeds", "0", "1"]).methods == ["opd", "rl"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "50"])  # not a multiple of --eval-every 20
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "1", "1"])


def test_the_start_is_the_demos_sft_stage_and_the_runs_are_valid(bench):
    demo = yaml.safe_load((ROOT / "examples" / "tiny-math.yaml").read_text())
    start = parse_run(bench.sft_only_run(demo, None))
    assert start.spec.enabled_stages() == ["sft"]
    assert start.spec.sft == parse_run(demo).spec.sft and start.spec.student == parse_run(demo).spec.student
    assert parse_run(bench.sft_only_run(demo, 20)).spec.sft.steps == 20
    args = bench.parse_args(["--quick"])
    for objective in ("distill", "rl"):
        run = parse_run(yaml.safe_load(bench.run_yaml(args, objective, Path("/s"), Path("/t"), 1e-4)))
        d = run.spec.distill
        assert (d.objective, d.steps, d.prompts_per_step, d.samples_per_prompt) == (objective, 4, 4, 2)
