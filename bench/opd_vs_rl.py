"""OPD vs RL from the same SFT checkpoint, compute-matched, with TRL's trainers beside ours: the claim
"on-policy distillation reaches RL's accuracy for a fraction of its compute", in miniature.

    make bench   (or: nice -n 10 .venv/bin/python bench/opd_vs_rl.py [--steps N] [--out DIR])
    smoke test, a few minutes: .venv/bin/python bench/opd_vs_rl.py --quick

Start: the demo's SFT checkpoint, the same weights for every method. The bench makes it as the demo does:
``opd run`` of examples/tiny-math.yaml with only its sft stage enabled (the same plan, so the same
``opd sft`` command line: 400 steps on 1,000 teacher traces from ``student-init``, ~62% held-out), in
``OUT/sft-start``; a later run with the same ``--out`` reuses it (``opd run --resume`` skips the finished
stage). ``--start DIR`` takes another checkpoint instead (e.g. a demo run's ``checkpoints/sft/final``).
From the tiny world's own ``student`` (~20%) RL gets almost no signal (most groups of samples are all
wrong), so that start would not compare the methods fairly. The tables' first line says which start ran.
Each method gets the same budget of optimizer steps, each step sampling ``--prompts`` prompts x
``--samples`` completions (max 64 new tokens, temperature 1) from tinymath's train split:

- ``opd``: our learner, objective ``distill`` (loss ``--opd-loss``, default ``importance_sampling``, the
  recipe's sampled-token reverse-KL advantage), in-process teacher (`tiny://teacher`, ~100%).
- ``rl``: our learner, objective ``rl`` (reward 1 for the right boxed answer, GRPO group-normalised
  advantages, the same loss and sampler), no teacher.
- ``trl-grpo``: TRL's ``GRPOTrainer`` with the same reward, prompts, group size, completions per step,
  learning rate, AdamW betas and gradient clipping (``beta=0``: no reference KL, as ours; ``loss_type="dapo"``:
  token-level normalisation, as ours; one optimizer step per generation batch, as ours).
- ``trl-distill``: TRL's on-policy ``DistillationTrainer`` (``beta=1``: full-vocabulary reverse KL to the
  same teacher) with as many sequences per step as ours (one completion per prompt, so prompts x samples
  prompts).

``--seeds 0 1 2`` runs every method once per seed (the prompt order and the sampling; the start, the
held-out problems and the teacher stay the same), in OUT/seed-N; the tables give at each step the mean
accuracy, its sample standard deviation over the seeds and each seed's accuracy, and the ratio of the mean
curves beside each seed's own. ``--methods`` picks which run; ``--opd-prompts/--opd-samples`` give the OPD
run its own batch shape (its row is then named e.g. ``opd-128x1``), e.g. TRL's DistillationTrainer's.

Held-out greedy accuracy (``--heldout`` tinymath test problems, as the demo's eval grades them) is measured
at the start and every ``--eval-every`` steps (our runs: their checkpoints; TRL: the final model).

Compute (FLOPs), counted per step from the tokens each method processed (prompt + completion tokens of every
sampled sequence; N = parameters of the model, embeddings included, as ``opd report`` counts them):
  sampling 2 * N_student * tokens  +  training (forward + backward) 6 * N_student * tokens
  +  OPD only: teacher scoring 2 * N_teacher * tokens  (RL's reward is a string comparison: 0 FLOPs).
TRL rows use the same formula on their own completion lengths. Wall-clock is the sum of step times (sample +
score + train), evaluation excluded.

The claim's ratio: C_RL = compute RL used to first reach its best held-out accuracy A; C_OPD = compute OPD used
to first reach >= A at a checkpoint; ratio C_RL / C_OPD ("not reached" when OPD never reaches A). With
few checkpoints both are measured at checkpoint resolution.

``--quick``: a smoke test of every part (SFT start, both learners, both TRL trainers, tables, plot) in a few
minutes: 20 SFT steps, 4 steps x 4 prompts x 2 samples, 20 held-out problems, in runs/opd-vs-rl-quick.
Its numbers say nothing about the methods.

Writes ``DIR/results.json``, ``DIR/accuracy_vs_flops.png`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import torch
import yaml


@dataclass
class Curve:
    method: str
    # {step, flops, seconds, accuracy}; a mean over seeds adds "accuracies": each seed's, in --seeds order
    points: list[dict] = field(default_factory=list)
    step_seconds: float = 0.0  # mean wall-clock seconds per optimizer step
    last10: dict[str, float] = field(default_factory=dict)  # batch metrics, mean of the last 10 steps


def parameters(model_dir: Path) -> int:
    from opd_runtime import modeling

    return sum(p.numel() for p in modeling.load_causal_lm(str(model_dir), dtype="float32").parameters())


def heldout_accuracy(model, tokenizer, problems) -> float:
    from opd_runtime.tiny_models import solved

    model.eval()
    with torch.no_grad():
        right = solved(model, tokenizer, problems, max_new_tokens=64)
    return sum(right) / len(right)


def accuracy_of(model_dir: Path, problems) -> float:
    from opd_runtime import modeling

    tok = modeling.load_tokenizer(str(model_dir))
    return heldout_accuracy(modeling.load_causal_lm(str(model_dir), dtype="float32"), tok, problems)


def shape(args, objective: str) -> tuple[int, int]:
    """(prompts, samples) per step of one of our runs: ``--opd-prompts/--opd-samples`` for OPD when given."""
    if objective == "distill":
        return args.opd_prompts or args.prompts, args.opd_samples or args.samples
    return args.prompts, args.samples


def opd_name(args) -> str:
    """ "opd", or "opd-PxS" when the OPD run's batch shape is not the others'."""
    prompts, samples = shape(args, "distill")
    return "opd" if (prompts, samples) == (args.prompts, args.samples) else f"opd-{prompts}x{samples}"


def run_yaml(args, objective: str, start: Path, teacher: Path, lr: float) -> str:
    prompts, samples = shape(args, objective)
    clip = "null" if args.max_grad_norm is None else args.max_grad_norm
    extra = (
        "".join(f"\n    {kv.partition('=')[0]}: {kv.partition('=')[2]}" for kv in args.opd_set)
        if objective == "distill"
        else ""
    )
    return f"""
apiVersion: opd.dev/v1alpha1
kind: DistillationRun
metadata: {{name: opd-vs-rl}}
spec:
  student: {{model: {start}, dtype: float32}}
  teacher: {{model: {teacher}, dtype: float32, backend: local}}
  distill:
    objective: {objective}
    prompts: {{name: tinymath, split: train, difficulty: 2}}
    loss: {args.opd_loss if objective == "distill" else args.rl_loss}
    steps: {args.steps}
    promptsPerStep: {prompts}
    samplesPerPrompt: {samples}
    microBatchSize: {prompts * samples}
    gradientCheckpointing: false
    maxNewTokens: 64
    seed: {args.seed}
    optimizer: {{learningRate: {lr}, warmupSteps: {args.warmup}, schedule: constant, maxGradNorm: {clip}}}
    checkpointing: {{every: {args.eval_every}, keep: {args.steps // args.eval_every + 1}}}
    metricsPort: 0{extra}
"""


def prompt_tokens_per_step(run, tokenizer) -> list[int]:
    """Prompt tokens of every sampled sequence, per step, in the learner's own prompt order."""
    from opd_runtime.data_sources import load_prompts
    from opd_runtime.training.batches import prompt_ids
    from opd_runtime.training.order import batch_at

    cfg = run.spec.distill
    records = load_prompts(cfg.prompts, Path("."))
    lengths: dict[str, int] = {}
    out = []
    for step in range(cfg.steps):
        batch = batch_at(records, step * cfg.prompts_per_step, cfg.prompts_per_step, cfg.seed)
        total = 0
        for r in batch:
            if r.id not in lengths:
                lengths[r.id] = len(prompt_ids(tokenizer, r.messages))
            total += lengths[r.id] * cfg.samples_per_prompt
        out.append(total)
    return out


def curve_from_steps(
    method: str,
    lines: list[dict],
    prompt_tokens: list[int],
    flops_per_token: float,
    eval_steps: range,
    start_accuracy: float,
    accuracy_at: Callable[[int], float],
) -> Curve:
    """The curve of one of our runs from its per-step metrics lines (``step``, ``completion_tokens``,
    ``step_seconds``) and the prompt tokens of each step: cumulative FLOPs and seconds at each of
    ``eval_steps``, with ``accuracy_at(step)`` there, after the start's point."""
    flops, seconds, cumulative = 0.0, 0.0, {}
    for line, prompt in zip(lines, prompt_tokens, strict=True):
        flops += flops_per_token * (prompt + line["completion_tokens"])
        seconds += line["step_seconds"]
        cumulative[line["step"]] = (flops, seconds)
    curve = Curve(method, step_seconds=seconds / len(lines))
    curve.points.append({"step": 0, "flops": 0.0, "seconds": 0.0, "accuracy": start_accuracy})
    for step in eval_steps:
        f, s = cumulative[step]
        curve.points.append({"step": step, "flops": f, "seconds": s, "accuracy": accuracy_at(step)})
    return curve


def ours(args, objective: str, start: Path, teacher: Path, problems, n_student: int, n_teacher: int, workdir: Path):
    from opd_runtime import modeling
    from opd_runtime.distill.learner import run_distill
    from opd_runtime.spec import parse_run

    lr = args.opd_lr if objective == "distill" else args.rl_lr
    run = parse_run(yaml.safe_load(run_yaml(args, objective, start, teacher, lr)))
    ws = workdir / f"ws-{objective}"
    shutil.rmtree(ws, ignore_errors=True)  # each bench run measures afresh (the SFT start is what is reused)
    run_distill(run, ws, log=lambda *_: None)
    lines = [json.loads(x) for x in (ws / "metrics" / "distill.jsonl").read_text().splitlines() if x.strip()]
    prompt_tokens = prompt_tokens_per_step(run, modeling.load_tokenizer(str(start)))
    per_token = 8.0 * n_student + (2.0 * n_teacher if objective == "distill" else 0.0)

    def accuracy_at(step: int) -> float:
        return accuracy_of(ws / "checkpoints" / "distill" / f"step-{step:06d}" / "model", problems)

    curve = curve_from_steps(
        opd_name(args) if objective == "distill" else "rl",
        lines,
        prompt_tokens,
        per_token,
        range(args.eval_every, args.steps + 1, args.eval_every),
        args.start_accuracy,
        accuracy_at,
    )
    keys = ("reward_mean", "zero_variance_group_fraction") if objective == "rl" else ("reverse_kl",)
    curve.last10 = {k: sum(r[k] for r in lines[-10:]) / len(lines[-10:]) for k in keys}
    return curve


def describe(last10: dict[str, float]) -> str:
    """The notes column: batch metrics of the last 10 steps."""
    names = {"reward_mean": "reward {:.3f}", "reverse_kl": "batch reverse KL {:.3f}"}
    names |= {"zero_variance_group_fraction": "zero-variance groups {:.0%}"}
    return ("last 10 steps: " + ", ".join(names[k].format(v) for k, v in last10.items())) if last10 else ""


def trl_dataset(args):
    from datasets import Dataset

    from opd_runtime.data_sources import load_prompts
    from opd_runtime.spec import DatasetSpec

    records = load_prompts(DatasetSpec(name="tinymath", split="train", difficulty=2), Path("."))
    return Dataset.from_list([{"prompt": r.messages, "answer": r.answer} for r in records])


def _common_trl_args(args, out: Path, lr: float, batch: int) -> dict:
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",  # ours: linear warmup, then constant
        warmup_steps=args.warmup,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,  # ours (OptimizerSpec's default)
        max_grad_norm=args.max_grad_norm if args.max_grad_norm is not None else 1e9,
        max_completion_length=64,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
    )


class _StepTimes:
    """A TrainerCallback recording the wall-clock seconds and logged completion lengths of each step."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Cb(TrainerCallback):
            def on_step_begin(self, *_a, **_k):
                outer.t0 = time.perf_counter()

            def on_step_end(self, *_a, **_k):
                outer.seconds.append(time.perf_counter() - outer.t0)

            def on_log(self, _args, _state, _control, logs=None, **_k):
                if logs:
                    outer.logs.append(dict(logs))

        self.t0 = 0.0
        self.seconds: list[float] = []
        self.logs: list[dict] = []
        self.callback = Cb()


def _completion_length(logs: list[dict]) -> float:
    vals = [v for log in logs for k, v in log.items() if k in ("completions/mean_length", "completion_length")]
    return sum(vals) / len(vals) if vals else 64.0


def trl_curve(method: str, trainer, tok, timer: _StepTimes, args, problems, prompt_len: float, flops_per_token: float):
    """Train ``trainer`` and measure it as our runs are measured: held-out greedy accuracy of the final
    model, FLOPs from its logged completion lengths (``prompt_len``: mean prompt tokens), step seconds."""
    trainer.train()
    acc = heldout_accuracy(trainer.model, tok, problems)
    tokens = args.steps * args.prompts * args.samples * (prompt_len + _completion_length(timer.logs))
    curve = Curve(method, step_seconds=sum(timer.seconds) / max(len(timer.seconds), 1))
    curve.points = [
        {"step": 0, "flops": 0.0, "seconds": 0.0, "accuracy": args.start_accuracy},
        {"step": args.steps, "flops": flops_per_token * tokens, "seconds": sum(timer.seconds), "accuracy": acc},
    ]
    return curve


def trl_grpo(args, start: Path, problems, n_student: int, prompt_len: float, workdir: Path) -> Curve:
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from opd_runtime import modeling
    from opd_runtime.distill import rl

    def reward(completions, answer, **_kw) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rl.rewards(texts, answer, "math")

    cfg = GRPOConfig(
        **_common_trl_args(args, workdir / "trl-grpo", args.rl_lr, args.prompts * args.samples),
        num_generations=args.samples,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        top_k=0,
        top_p=1.0,
    )
    tok, timer = modeling.load_tokenizer(str(start)), _StepTimes()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(start), dtype=torch.float32),
        reward_funcs=reward,
        args=cfg,
        train_dataset=trl_dataset(args),
        processing_class=tok,
        callbacks=[timer.callback],
    )
    curve = trl_curve("trl-grpo", trainer, tok, timer, args, problems, prompt_len, 8.0 * n_student)
    rewards = [log["reward"] for log in timer.logs if "reward" in log][-10:]
    if rewards:
        curve.last10 = {"reward_mean": sum(rewards) / len(rewards)}
    return curve


def trl_distill(args, start: Path, teacher: Path, problems, n_student: int, n_teacher: int, prompt_len: float, workdir):
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    from opd_runtime import modeling

    cfg = DistillationConfig(
        **_common_trl_args(args, workdir / "trl-distill", args.trl_distill_lr, args.prompts * args.samples),
        beta=1.0,
        top_k=0,
        top_p=1.0,
    )
    tok, timer = modeling.load_tokenizer(str(start)), _StepTimes()
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(start), dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32),
        args=cfg,
        train_dataset=trl_dataset(args),
        processing_class=tok,
        callbacks=[timer.callback],
    )
    return trl_curve("trl-distill", trainer, tok, timer, args, problems, prompt_len, 8.0 * n_student + 2.0 * n_teacher)


def compute_ratio(opd: Curve, rl_curve: Curve) -> dict:
    """C_RL (first reaching RL's best accuracy) / C_OPD (first reaching that accuracy), at checkpoints."""
    best = max(p["accuracy"] for p in rl_curve.points)
    c_rl = next(p for p in rl_curve.points if p["accuracy"] == best)
    c_opd = next((p for p in opd.points if p["accuracy"] >= best), None)
    out = {"rl_best_accuracy": best, "rl_flops": c_rl["flops"], "rl_step": c_rl["step"]}
    if c_opd is None:
        return out | {"opd_flops": None, "ratio": None, "text": "not reached: OPD never reached RL's best accuracy"}
    if c_rl["flops"] == 0:
        return out | {"opd_flops": 0.0, "ratio": None, "text": "RL never improved on the start: no ratio"}
    if c_opd["flops"] == 0:
        return out | {"opd_flops": 0.0, "ratio": None, "text": "the start already had RL's best accuracy"}
    ratio = c_rl["flops"] / c_opd["flops"]
    return out | {"opd_flops": c_opd["flops"], "opd_step": c_opd["step"], "ratio": ratio, "text": f"{ratio:.1f}x"}


def mean_curve(runs: list[Curve]) -> Curve:
    """One method's curve over several seeds: mean compute, seconds and accuracy at each evaluated step, with
    each seed's accuracy kept (``accuracies``) and the last-10-step metrics averaged."""
    steps = [[p["step"] for p in c.points] for c in runs]
    if any(s != steps[0] for s in steps) or len({c.method for c in runs}) != 1:
        raise ValueError(f"seeds of one method must share its evaluated steps: {[c.method for c in runs]}, {steps}")
    out = Curve(runs[0].method, step_seconds=mean([c.step_seconds for c in runs]))
    for i, step in enumerate(steps[0]):
        at = [c.points[i] for c in runs]
        accuracies = [p["accuracy"] for p in at]
        out.points.append(
            {
                "step": step,
                "flops": mean([p["flops"] for p in at]),
                "seconds": mean([p["seconds"] for p in at]),
                "accuracy": mean(accuracies),
                "accuracies": accuracies,
            }
        )
    out.last10 = {k: mean([c.last10[k] for c in runs]) for k in runs[0].last10 if all(k in c.last10 for c in runs)}
    return out


def accuracy_text(point: dict) -> str:
    """ "75.5%" for one seed; over seeds "75.5% ± 1.3 (74.0 / 76.0 / 76.5)": mean, sample standard deviation
    in points, and each seed's accuracy."""
    accs = point.get("accuracies", [point["accuracy"]])
    if len(accs) < 2:
        return f"{point['accuracy']:.1%}"
    return f"{point['accuracy']:.1%} ± {100 * stdev(accs):.1f} ({' / '.join(f'{100 * a:.1f}' for a in accs)})"


def tables(curves: list[Curve], ratio: dict | None, start_label: str, seed_ratios: list[str] | None = None) -> str:
    """The bench's Markdown tables: accuracy vs compute at each evaluated step, then per method its step
    time and gain, then the compute ratio (of the mean curves, then per seed when there are several); the
    first line says where every method started."""
    out = [f"Start (every method): {start_label}", "", "| method | step | GFLOP | wall s | held-out greedy accuracy |"]
    out.append("|---|---|---|---|---|")
    for c in curves:
        for p in c.points:
            out.append(
                f"| {c.method} | {p['step']} | {p['flops'] / 1e9:.1f} | {p['seconds']:.0f} | {accuracy_text(p)} |"
            )
    out += ["", "| method | s / step | accuracy gain (start -> end) | notes |", "|---|---|---|---|"]
    for c in curves:
        first, last = c.points[0], c.points[-1]
        gain = f"{first['accuracy']:.1%} -> {accuracy_text(last)} ({last['accuracy'] - first['accuracy']:+.1%})"
        out.append(f"| {c.method} | {c.step_seconds:.2f} | {gain} | {describe(c.last10)} |")
    if ratio is not None:
        out += [
            "",
            f"RL's best: {ratio['rl_best_accuracy']:.1%} at step {ratio['rl_step']} "
            f"({ratio['rl_flops'] / 1e9:.1f} GFLOP); compute RL needed / compute OPD needed for it: {ratio['text']}",
        ]
        if seed_ratios:
            out.append(f"The same ratio of each seed's own curves: {', '.join(seed_ratios)}")
    return "\n".join(out) + "\n"


def plot(curves: list[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c in curves:
        xs = [p["flops"] / 1e9 for p in c.points]
        ys = [100 * p["accuracy"] for p in c.points]
        ax.plot(xs, ys, marker="o" if len(xs) > 2 else "s", ls="-" if len(xs) > 2 else ":", label=c.method)
    ax.set(xlabel="compute (GFLOP)", ylabel="held-out greedy accuracy (%)", title="OPD vs RL on the tiny world")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METHODS = ("opd", "rl", "trl-grpo", "trl-distill")
DEMO = Path(__file__).resolve().parents[1] / "examples" / "tiny-math.yaml"
# the measured bench, and --quick: a smoke test of every part in a few minutes (numbers meaningless)
FULL: dict[str, Any] = dict(
    steps=60, prompts=32, samples=4, eval_every=20, heldout=200, sft_steps=None, out=Path("runs/opd-vs-rl")
)
QUICK: dict[str, Any] = dict(
    steps=4, prompts=4, samples=2, eval_every=2, heldout=20, sft_steps=20, out=Path("runs/opd-vs-rl-quick")
)


def sft_only_run(demo: dict, sft_steps: int | None) -> dict:
    """The demo's run file with only its sft stage enabled (``sft_steps``: fewer steps, for --quick)."""
    doc = json.loads(json.dumps(demo))
    doc["metadata"]["name"] = "opd-vs-rl-start"
    doc["spec"]["distill"]["enabled"] = False
    doc["spec"]["eval"]["enabled"] = False
    if sft_steps is not None:
        doc["spec"]["sft"]["steps"] = sft_steps
    return doc


def sft_start(args) -> tuple[Path, str]:
    """The start checkpoint and how it was made: ``--start``, else the demo's SFT stage run by ``opd run``
    (the plan's own ``opd sft`` command) in OUT/sft-start, reused when it has finished there before."""
    if args.start is not None:
        return args.start.resolve(), f"--start {args.start}"
    from opd_runtime.runner import opd_program

    workdir = args.out / "sft-start"
    doc = sft_only_run(yaml.safe_load(DEMO.read_text()), args.sft_steps)
    run_file = args.out / "sft-start.yaml"
    run_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    cmd = [opd_program(), "run", str(run_file), "--workspace", str(workdir), "--resume", "--no-progress"]
    print("start:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    final = workdir / "checkpoints" / "sft" / "final"
    label = (
        f"the demo's SFT checkpoint {final} (`opd run` of examples/tiny-math.yaml's sft stage: "
        f"{doc['spec']['sft']['steps']} steps from student-init on {doc['spec']['sft']['dataset']['maxSamples']:,} "
        "teacher traces)"
    )
    return final.resolve(), label


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (below); explicit flags still win")
    for key, text in (
        ("steps", "optimizer steps per method"),
        ("prompts", "prompts per step"),
        ("samples", "completions per prompt (RL's group size)"),
        ("eval_every", "steps between held-out evaluations of our runs"),
        ("heldout", "held-out tinymath test problems"),
    ):
        ap.add_argument(
            f"--{key.replace('_', '-')}", type=int, help=f"{text} (default {FULL[key]}; --quick {QUICK[key]})"
        )
    ap.add_argument("--sft-steps", type=int, help="steps of the SFT start (default: the demo's; --quick 20)")
    ap.add_argument("--opd-loss", default="importance_sampling", help="loss of the OPD run")
    ap.add_argument("--opd-lr", type=float, default=1e-4, help="learning rate of the OPD run")
    ap.add_argument("--rl-loss", default="importance_sampling", help="loss of the RL run (importance_sampling|ppo)")
    ap.add_argument("--rl-lr", type=float, default=1e-4, help="learning rate of our RL run and TRL's GRPO")
    ap.add_argument("--trl-distill-lr", type=float, default=None, help="TRL DistillationTrainer's (default: --opd-lr)")
    ap.add_argument("--warmup", type=int, default=10, help="linear warmup steps for all (then constant)")
    ap.add_argument(
        "--opd-set", action="append", default=[], metavar="KEY=VALUE", help="extra spec.distill field of the OPD run"
    )
    ap.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping for all (default: none)")
    ap.add_argument(
        "--start", type=Path, help="start model (default: the demo's SFT checkpoint, made in OUT/sft-start)"
    )
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="run every method once per seed (prompt order, sampling); tables give the mean, spread and each seed's",
    )
    ap.add_argument("--opd-prompts", type=int, help="prompts per step of the OPD run only (default --prompts)")
    ap.add_argument("--opd-samples", type=int, help="completions per prompt of the OPD run only (default --samples)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models gain nothing from more)")
    ap.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="which to run (default: all four)"
    )
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL rows (--methods opd rl)")
    ap.add_argument("--out", type=Path, help="output folder (default runs/opd-vs-rl; --quick runs/opd-vs-rl-quick)")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps % args.eval_every:
        ap.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    args.trl_distill_lr = args.trl_distill_lr or args.opd_lr
    # METHODS order whatever the order given: main's ratio takes opd and rl as the first two curves
    args.methods = [m for m in METHODS if m in args.methods and not (args.no_trl and m.startswith("trl"))]
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed: {args.seeds}")
    args.seed = args.seeds[0]  # the seed of the run being made: main sets each in turn
    return args


def main() -> None:
    args = parse_args()
    from opd_runtime import modeling, tinymath
    from opd_runtime.tiny_models import WorldConfig, build_cached, default_cache_dir
    from opd_runtime.training.batches import prompt_ids

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    world = args.out / "models"
    build_cached(world, WorldConfig(), default_cache_dir(), log=print)
    start, start_how = sft_start(args)
    teacher = (world / "teacher").resolve()
    problems = tinymath.generate(args.heldout, split="test", seed=0, difficulty=2)
    n_student, n_teacher = parameters(start), parameters(teacher)
    args.start_accuracy = accuracy_of(start, problems)
    args.start_label = (
        f"{start_how}, held-out greedy {args.start_accuracy:.1%} of {args.heldout}; {args.steps} steps x "
        f"{args.prompts} prompts x {args.samples} samples each"
        + ("" if opd_name(args) == "opd" else f" (OPD: {' x '.join(map(str, shape(args, 'distill')))})")
    )
    tok = modeling.load_tokenizer(str(start))
    train = tinymath.generate(500, split="train", seed=0, difficulty=2)
    prompt_len = sum(len(prompt_ids(tok, tinymath.chat_messages(p.problem))) for p in train) / len(train)
    print(f"start: {args.start_label}; student {n_student:,} parameters, teacher {n_teacher:,}", flush=True)

    runs: dict[int, list[Curve]] = {}
    trl_error = None
    for seed in args.seeds:
        args.seed = seed
        runs[seed], trl_error = one_seed(args, start, teacher, problems, n_student, n_teacher, prompt_len)
    curves = [mean_curve([runs[seed][i] for seed in args.seeds]) for i in range(len(runs[args.seeds[0]]))]
    ratio, seed_ratios = None, None
    if "opd" in args.methods and "rl" in args.methods:
        ratio = compute_ratio(curves[0], curves[1])
        if len(args.seeds) > 1:
            seed_ratios = [f"seed {seed} {compute_ratio(runs[seed][0], runs[seed][1])['text']}" for seed in args.seeds]
    seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"mean of seeds {', '.join(map(str, args.seeds))}"
    print("\n" + tables(curves, ratio, f"{args.start_label}; {seeds}", seed_ratios))
    plot(curves, args.out / "accuracy_vs_flops.png")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "seed")}
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "curves": [asdict(c) for c in curves],  # means over the seeds
                "ratio": ratio,
                "seeds": {seed: [asdict(c) for c in runs[seed]] for seed in args.seeds},
                "seed_ratios": seed_ratios,
                "trl_error": trl_error,
            },
            indent=2,
        )
    )
    print(f"{args.out}/accuracy_vs_flops.png, {args.out}/results.json; {time.perf_counter() - t_all:.0f} s in all")


def one_seed(args, start, teacher, problems, n_student, n_teacher, prompt_len) -> tuple[list[Curve], str | None]:
    """Every method of ``args.methods`` with seed ``args.seed``, in OUT/seed-N (OUT itself for one seed 0,
    as before seeds were an option), in METHODS order."""
    workdir = args.out if args.seeds == [0] else args.out / f"seed-{args.seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    curves: list[Curve] = []
    for method in args.methods:
        t0 = time.perf_counter()
        try:
            if method in ("opd", "rl"):
                objective = "distill" if method == "opd" else "rl"
                curves.append(ours(args, objective, start, teacher, problems, n_student, n_teacher, workdir))
            elif method == "trl-grpo":
                curves.append(trl_grpo(args, start, problems, n_student, prompt_len, workdir))
            else:
                curves.append(trl_distill(args, start, teacher, problems, n_student, n_teacher, prompt_len, workdir))
        except ImportError as err:  # the `bench` extra is not installed
            if not method.startswith("trl"):
                raise
            error = f"TRL rows skipped: {err} (pip install 'opd[bench]')"
            print(error)
            return curves, error
        print(f"seed {args.seed}: {curves[-1].method}: {time.perf_counter() - t0:.0f} s", flush=True)
    return curves, None


if __name__ == "__main__":
    main()
