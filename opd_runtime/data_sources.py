"""Problem sets: where prompts (and reference answers) come from.

Sources, chosen by a ``DatasetSpec``: the built-in sets (``tinymath``, ``aime24`` and ``gsm8k``, the latter
two shipped with the package, provenance in ``opd_runtime/data/PROVENANCE.md``), a local .jsonl/.parquet
file, or a Hugging Face hub dataset by name (streamed, via the optional ``datasets`` package).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from . import tinymath

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BUILTIN_FILES = {"aime24": "aime24.jsonl", "gsm8k": "gsm8k_test.jsonl"}
TINYMATH_SIZES = {"train": 50_000, "test": 500}


@dataclass(frozen=True)
class PromptRecord:
    id: str
    messages: list[dict]
    answer: str | None


def _read_local(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        raise ValueError(f"dataset path {path}: use a .jsonl or .parquet file")


def iter_records(spec, workspace: Path | None = None) -> Iterator[dict]:
    """Raw records of a dataset spec (before format handling)."""
    if spec.path is not None:
        path = Path(spec.path)
        if not path.is_absolute() and workspace is not None:
            path = workspace / path
        if not path.exists():
            raise FileNotFoundError(f"dataset path {path} does not exist")
        yield from _read_local(path)
    elif spec.name in BUILTIN_FILES:
        ref = resources.files("opd_runtime").joinpath("data", BUILTIN_FILES[spec.name])
        with ref.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    elif spec.name == "tinymath":
        size = spec.max_samples or TINYMATH_SIZES.get(spec.split, 1000)
        for p in tinymath.generate(size, split=spec.split, seed=spec.seed, difficulty=spec.difficulty):
            yield p.to_json()
    else:
        try:
            import datasets
        except ImportError as err:
            raise RuntimeError(f"dataset {spec.name!r} is a hub dataset; install the `data` extra "
                               "(pip install 'opd[data]')") from err
        yield from datasets.load_dataset(spec.name, split=spec.split, streaming=True)


def _problem_of(record: dict, spec) -> tuple[str, str | None]:
    if spec.format in ("openthoughts", "chat") or (spec.format == "auto" and spec.problem_field not in record):
        turns = record.get("conversations") or record.get("messages")
        if not turns:
            raise ValueError(f"record has neither `{spec.problem_field}` nor conversations/messages: "
                             f"{sorted(record)}; set problemField")
        first = next(t for t in turns if t.get("from", t.get("role")) in ("human", "user"))
        return first.get("value", first.get("content")), record.get(spec.answer_field)
    return record[spec.problem_field], record.get(spec.answer_field)


def load_prompts(spec, workspace: Path | None = None) -> list[PromptRecord]:
    """Prompts of a dataset as chat messages, with their reference answers when present."""
    out = []
    for i, rec in enumerate(iter_records(spec, workspace)):
        if spec.max_samples is not None and i >= spec.max_samples:
            break
        if spec.name == "tinymath":
            msgs = tinymath.chat_messages(rec["problem"])
            out.append(PromptRecord(rec["id"], msgs, rec["answer"]))
            continue
        problem, answer = _problem_of(rec, spec)
        msgs = [{"role": "user", "content": f"{problem}\n{MATH_INSTRUCTION}"}]
        out.append(PromptRecord(str(rec.get("id", i)), msgs, None if answer is None else str(answer)))
    if not out:
        raise ValueError(f"dataset {spec.name or spec.path} (split {spec.split}) has no records")
    return out
