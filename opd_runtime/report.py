"""The end of ``opd run``: a results table, ``report.md`` and PNG plots, from the workspace's files.

Everything is read back from what the stages wrote (results/, metrics/, eval/), so a report can be
rebuilt for any workspace, including one filled by pods on a cluster (``opd report --workspace DIR``).

Compute is estimated with the usual transformer rule of thumb: 2 FLOPs per parameter per token for a
forward pass (sampling, teacher scoring, evaluation) and 6 for forward plus backward (training).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .spec import DistillationRun
from .workspace import Workspace

# Names in the report for eval targets, in the order a reader follows the pipeline.
TARGET_TITLES = {"student": "student before SFT", "sft": "after SFT", "distill": "after OPD", "teacher": "teacher"}


def count_parameters(model_dir: str | Path) -> int | None:
    """Parameters of a saved model, from its safetensors headers (no torch, no weights read)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                size = 1
                for d in info["shape"]:
                    size *= d
                total += size
    return total


def _records(ws: Workspace, stage: str) -> list[dict]:
    path = ws.metrics(stage)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def stage_flops(run: DistillationRun, ws: Workspace) -> dict[str, float]:
    """Estimated FLOPs per stage from the tokens each stage recorded."""
    flops: dict[str, float] = {}
    # a report only reads: a tiny world that is not in the workspace is not built for it
    student = count_parameters(ws.resolve(run.spec.student.model))
    teacher = count_parameters(ws.resolve(run.spec.teacher.model))
    sft = _records(ws, "sft")
    if sft and student:
        flops["sft"] = 6.0 * student * sum(r.get("tokens", r["completion_tokens"]) for r in sft)
    distill = _records(ws, "distill")
    if distill and student:
        tokens = sum(r.get("tokens", r["completion_tokens"]) for r in distill)
        # sample (forward), train (forward + backward), teacher scoring (teacher forward)
        scored = run.spec.distill is None or run.spec.distill.objective == "distill"  # rl has no teacher
        flops["distill"] = (2.0 + 6.0) * student * tokens + 2.0 * (teacher or 0) * tokens * scored
    total = 0.0
    for path in ws.root.glob("eval/*/*.json"):
        r = json.loads(path.read_text())
        n = count_parameters(r.get("model", ""))
        if n:
            total += 2.0 * n * r["n_problems"] * _mean(r["samples_per_problem"]) * r["mean_completion_tokens"]
    if total:
        flops["eval"] = total
    return flops


def _mean(x) -> float:
    return sum(x) / len(x) if isinstance(x, list) else float(x)


def method_name(run: DistillationRun) -> str:
    """What the distill stage did, for the report's words: `RL` with objective rl, else `OPD`."""
    d = run.spec.distill
    return "RL" if d is not None and d.objective == "rl" else "OPD"


def _titles(method: str) -> dict[str, str]:
    """Eval target -> its title in the report, the distill stage's model being `after <method>`."""
    return {**TARGET_TITLES, "distill": f"after {method}"}


def accuracy_table(ws: Workspace, method: str = "OPD") -> list[tuple[str, str, float, float]]:
    """(target title, dataset, pass@1, majority vote) rows from results/eval.json, pipeline order; the
    distill stage's model is `after <method>`."""
    summary = _json(ws.result("eval")) or {"targets": {}}
    titles = _titles(method)
    rows = []
    for target in sorted(summary["targets"], key=lambda t: list(TARGET_TITLES).index(t) if t in TARGET_TITLES else 99):
        for label, r in summary["targets"][target].items():
            rows.append((titles.get(target, target), label, r["pass_at_1"], r["majority_vote"]))
    return rows


def _fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.2e} FLOP"


def plot(ws: Workspace, out_dir: Path, method: str = "OPD") -> list[Path]:
    """PNG plots: OPD reverse KL per step, SFT loss per step, accuracy per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    distill = [r for r in _records(ws, "distill") if r.get("reverse_kl") is not None]  # none with objective rl
    if distill:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in distill], [r["reverse_kl"] for r in distill], lw=1, alpha=0.5, label="per step")
        span = max(1, len(distill) // 20)
        kl = [r["reverse_kl"] for r in distill]
        smooth = [sum(kl[max(0, i - span + 1) : i + 1]) / len(kl[max(0, i - span + 1) : i + 1]) for i in range(len(kl))]
        ax.plot([r["step"] for r in distill], smooth, lw=2, label=f"mean of {span}")
        ax.set(xlabel="OPD step", ylabel="reverse KL (nats/token)", title="Student-teacher reverse KL")
        ax.legend()
        written.append(_save(fig, out_dir / "reverse_kl.png"))
    sft = _records(ws, "sft")
    if sft:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in sft], [r["loss"] for r in sft], lw=1)
        ax.set(xlabel="SFT step", ylabel="loss (nats/token)", title="SFT loss")
        written.append(_save(fig, out_dir / "sft_loss.png"))
    rows = accuracy_table(ws, method)
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{t}\n{d}" if len({r[1] for r in rows}) > 1 else t for t, d, _, _ in rows]
        ax.bar(labels, [100 * r[2] for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            ax.text(i, 100 * r[2] + 1, f"{100 * r[2]:.1f}%", ha="center")
        ax.set(ylabel="pass@1 (%)", ylim=(0, 110), title="Held-out accuracy")
        written.append(_save(fig, out_dir / "accuracy.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# A step's batch metrics are noisy (reverse KL moves by about +-0.1 between steps on the tiny world), so the
# report compares means over windows of steps, with the standard error of each mean, never single steps.
CURVE_FIELDS = {
    "sft": ["loss"],
    "distill": ["reverse_kl", "loss", "entropy", "sample_accuracy", "reward_mean", "grad_norm"],
}
MAX_WINDOW = 10


def window(n_steps: int) -> int:
    """Steps averaged at each end of a run: 10, or a fifth of a short run (at least 1)."""
    return max(1, min(MAX_WINDOW, n_steps // 5))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def curve_rows(ws: Workspace) -> list[tuple[str, str, int, int, tuple[float, float], tuple[float, float]]]:
    """(stage, field, window, steps, (mean, SE) over the first window, (mean, SE) over the last) per field."""
    out = []
    for stage, fields in CURVE_FIELDS.items():
        records = _records(ws, stage)
        for field in fields:
            vals = [float(r[field]) for r in records if r.get(field) is not None]
            if vals:
                k = window(len(vals))
                out.append((stage, field, k, len(vals), mean_se(vals[:k]), mean_se(vals[-k:])))
    return out


def gap_closed(rows: list[tuple[str, str, float, float]], method: str = "OPD") -> dict[str, float] | None:
    """Share of the after-SFT -> teacher accuracy gap that the distill stage (OPD or RL) closed, per dataset
    (needs all three rows)."""
    acc = {(t, d): p for t, d, p, _ in rows}
    titles = _titles(method)
    out = {}
    for d in {d for _, d, _, _ in rows}:
        sft, opd, teacher = (acc.get((titles[t], d)) for t in ("sft", "distill", "teacher"))
        if sft is not None and opd is not None and teacher is not None and teacher > sft:
            out[d] = (opd - sft) / (teacher - sft)
    return out or None


@dataclass
class Side:
    """One run of a side-by-side comparison (``opd report --compare``): its label, run file, workspace and
    stage wall times (``RunState.stages``)."""

    label: str
    run: DistillationRun
    ws: Workspace
    stage_times: dict[str, dict]


@dataclass
class Compared:
    """One row of ``comparison``: a run's distill stage on one eval dataset (accuracies are fractions)."""

    run: str
    method: str  # OPD or RL
    budget: str  # steps × prompts × samples
    dataset: str
    after_sft: float | None
    after: float | None
    teacher: float | None
    gap_closed: float | None  # share of the SFT -> teacher gap the stage closed (gap_closed)
    flops: float | None  # the stage's estimated compute
    seconds: float | None  # the stage's wall time


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def comparison(sides: list[Side]) -> tuple[list[Compared], list[str]]:
    """Runs side by side, per eval dataset: the distill stage's method and budget, accuracy after SFT, after
    the stage and of the teacher, the share of the gap closed, the stage's estimated compute and wall time.
    Returns the rows and the Markdown (table, then what can be said from one run each)."""
    rows = []
    for side in sides:
        method, d = method_name(side.run), side.run.spec.distill
        table, titles = accuracy_table(side.ws, method), _titles(method)
        acc = {(t, ds): p for t, ds, p, _ in table}
        gaps = gap_closed(table, method) or {}
        flops = stage_flops(side.run, side.ws).get("distill")  # once per run: it reads every metrics line
        for ds in sorted({ds for _, ds in acc}):
            rows.append(
                Compared(
                    run=side.label,
                    method=method,
                    budget=f"{d.steps} × {d.prompts_per_step} × {d.samples_per_prompt}" if d else "—",
                    dataset=ds,
                    after_sft=acc.get((titles["sft"], ds)),
                    after=acc.get((titles["distill"], ds)),
                    teacher=acc.get((titles["teacher"], ds)),
                    gap_closed=gaps.get(ds),
                    flops=flops,
                    seconds=side.stage_times.get("distill", {}).get("seconds"),
                )
            )
    if not rows:
        labels = ", ".join(side.label for side in sides)
        return rows, [f"Nothing to compare: no eval results (results/eval.json) in {labels}.", ""]
    lines = [
        "| run | method | steps × prompts × samples | dataset | after SFT | after the stage | teacher | gap closed "
        "| compute | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "—" if r.gap_closed is None else f"{r.gap_closed:.0%}"
        compute = "—" if r.flops is None else _fmt_flops(r.flops)
        secs = "—" if r.seconds is None else f"{r.seconds:.0f} s"
        lines.append(
            f"| {r.run} | {r.method} | {r.budget} | {r.dataset} | {_pct(r.after_sft)} | {_pct(r.after)} "
            f"| {_pct(r.teacher)} | {gap} | {compute} | {secs} |"
        )
    lines.append("")
    for ds in sorted({r.dataset for r in rows}):
        here = [r for r in rows if r.dataset == ds]
        starts = sorted({r.after_sft for r in here if r.after_sft is not None})
        if len(starts) > 1:
            seen = ", ".join(_pct(s) for s in starts)
            lines.append(
                f"On {ds} the runs did not start from the same SFT accuracy ({seen}): their gains do not compare."
            )
            continue
        a, b = here if len(here) == 2 else (None, None)
        if a and b and a.after is not None and b.after is not None and a.flops and b.flops:
            lines.append(
                f"On {ds}, from the same SFT accuracy ({_pct(a.after_sft)}): {a.method} ({a.run}) {_pct(a.after)} "
                f"with {_fmt_flops(a.flops)}, {b.method} ({b.run}) {_pct(b.after)} with {_fmt_flops(b.flops)}: "
                f"{100 * (a.after - b.after):+.1f} points for {a.flops / b.flops:.2f}× the compute. One run each: an "
                "accuracy on a few hundred problems is uncertain by a few points; `bench/opd_vs_rl.py --seeds` "
                "measures the spread over seeds and the compute each method needs to reach a given accuracy."
            )
    return rows, [*lines, ""]


def write_report(
    run: DistillationRun,
    ws: Workspace,
    stage_times: dict[str, dict],
    stages: list[str],
    echo=print,
    compare: list[Side] | None = None,
) -> dict:
    """Print the results table and write report.md with its plots; returns the numbers in it. ``compare``:
    other runs (e.g. the demo's RL baseline) to set beside this one in a section of their own."""
    method = method_name(run)
    rows = accuracy_table(ws, method)
    distill = [r for r in _records(ws, "distill") if r.get("reverse_kl") is not None]  # none with objective rl
    flops = stage_flops(run, ws)
    kl = None
    if distill:
        k = window(len(distill))
        kl = {
            "first": sum(r["reverse_kl"] for r in distill[:k]) / k,
            "last": sum(r["reverse_kl"] for r in distill[-k:]) / k,
            "window": k,
            "steps": len(distill),
        }
    plots = plot(ws, ws.root, method)

    lines = [f"# Run `{run.metadata.name}`", ""]
    if rows:
        lines += ["## Held-out accuracy", "", "| model | dataset | pass@1 | majority vote |", "|---|---|---|---|"]
        lines += [f"| {t} | {d} | {100 * p:.1f}% | {100 * m:.1f}% |" for t, d, p, m in rows]
        lines.append("")
    gaps = gap_closed(rows, method)
    for d, share in sorted((gaps or {}).items()):
        lines += [
            f"{method} closed {share:.0%} of the gap between the SFT student and the teacher on {d} (pass@1).",
            "",
        ]
    compared: list[Compared] = []
    if compare:
        compared, table = comparison([Side("this run", run, ws, stage_times), *compare])
        lines += ["## Compared", "", *table]
    curves = curve_rows(ws)
    if curves:
        lines += [
            "## Training curves",
            "",
            "Means over the first and the last steps of each stage (± their standard error): single steps are "
            "too noisy to compare.",
            "",
            "| stage | metric | steps averaged | first steps | last steps |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {st} | {f} | {k} of {n} | {a[0]:.4g} ± {a[1]:.2g} | {b[0]:.4g} ± {b[1]:.2g} |"
            for st, f, k, n, a, b in curves
        ]
        lines.append("")
    if kl:
        lines += [
            "## On-policy distillation",
            "",
            f"Reverse KL(student ‖ teacher) on the step's own samples, mean of {kl['window']} steps: "
            f"{kl['first']:.3f} at the start → {kl['last']:.3f} at the end ({kl['steps']} steps).",
            "",
        ]
    lines += ["## Stages", "", "| stage | wall time | attempts | estimated compute |", "|---|---|---|---|"]
    for stage in stages:
        t = stage_times.get(stage, {})
        secs = f"{t['seconds']:.0f} s" if t else "—"
        lines.append(
            f"| {stage} | {secs} | {t.get('attempts', '—')} | {_fmt_flops(flops[stage]) if stage in flops else '—'} |"
        )
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["Compute is estimated as 2 FLOPs per parameter per forward token and 6 per trained token.", ""]
    (ws.root / "report.md").write_text("\n".join(lines))

    echo("")
    if rows:
        width = max(len(t) for t, *_ in rows)
        echo(f"{'model':<{width}}  {'dataset':<12} {'pass@1':>7} {'majority':>9}")
        for target, d, p, m in rows:
            echo(f"{target:<{width}}  {d:<12} {100 * p:>6.1f}% {100 * m:>8.1f}%")
    for d, share in sorted((gaps or {}).items()):
        echo(f"{method} closed {share:.0%} of the SFT -> teacher gap on {d}")
    if kl:
        echo(
            f"OPD reverse KL (means of {kl['window']} steps): {kl['first']:.3f} -> {kl['last']:.3f} "
            f"over {kl['steps']} steps"
        )
    for stage in stages:
        times = stage_times.get(stage)
        if times:
            echo(
                f"{stage:<8} {times['seconds']:>7.0f} s" + (f"   ~{_fmt_flops(flops[stage])}" if stage in flops else "")
            )
    if compared:
        echo("compared:")
        for r in compared:
            echo(
                f"  {r.run:<20} {r.method:<4} {r.dataset:<12} {_pct(r.after_sft)} -> {_pct(r.after)}"
                + (f"   ~{_fmt_flops(r.flops)}" if r.flops else "")
            )
    echo(f"report: {ws.root / 'report.md'}")
    return {
        "accuracy": [{"model": t, "dataset": d, "pass_at_1": p, "majority_vote": m} for t, d, p, m in rows],
        "reverse_kl": kl,
        "gap_closed": gaps,
        "flops": flops,
        "stage_seconds": {s: t["seconds"] for s, t in stage_times.items()},
        "compared": [asdict(r) for r in compared],
    }
