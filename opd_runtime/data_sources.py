"""Problem sets: where prompts (and reference answers) come from.

Sources, chosen by a ``DatasetSpec``: the built-in sets (``tinymath``, ``aime24`` and ``gsm8k``, the latter
two shipped with the package, provenance in ``opd_runtime/data/PROVENANCE.md``), a local .jsonl/.parquet
file, or a Hugging Face hub dataset by name (streamed, via the optional ``datasets`` package).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import tinymath
from .spec import DatasetSpec, SpecError

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BUILTIN_FILES = {"aime24": "aime24.jsonl", "gsm8k": "gsm8k_test.jsonl"}
TINYMATH_SIZES = {"train": 50_000, "test": 500}


@dataclass(frozen=True)
class PromptRecord:
    id: str
    messages: list[dict[str, str]]
    answer: str | None


def _read_local(path: Path, field: str) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SpecError(
                            f"{field}.path: line {n} of {path} is not JSON ({err}); fix the file "
                            "or point `path` at another one"
                        ) from None
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        raise SpecError(f"{field}.path: {path} is neither a .jsonl nor a .parquet file; convert it to one of them")


def iter_records(
    spec: DatasetSpec, workspace: Path | None = None, *, field: str = "dataset"
) -> Iterator[dict[str, Any]]:
    """Raw records of a dataset spec (before format handling); ``field`` is the spec's path in the run
    file (e.g. ``spec.sft.dataset``), which configuration errors name."""
    if spec.path is not None:
        path = Path(spec.path)
        if not path.is_absolute() and workspace is not None:
            path = workspace / path
        if not path.exists():
            raise SpecError(f"{field}.path: {path} does not exist; a relative path is taken relative to the workspace")
        yield from _read_local(path, field)
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
        except ImportError:
            raise SpecError(
                f"{field}.name: {spec.name!r} is a Hugging Face hub dataset, and the `datasets` "
                "package is not installed; install the `data` extra (pip install 'opd[data]') or "
                "use a built-in set or a local `path`"
            ) from None
        yield from datasets.load_dataset(spec.name, split=spec.split, streaming=True)


def _problem_of(record: dict[str, Any], spec: DatasetSpec, field: str) -> tuple[str, Any]:
    if spec.format in ("openthoughts", "chat") or (spec.format == "auto" and spec.problem_field not in record):
        turns = record.get("conversations") or record.get("messages")
        if not turns:
            raise SpecError(
                f"{field}: a record has neither the problem field `{spec.problem_field}` nor "
                f"conversations/messages (its fields: {sorted(record)}); set problemField"
            )
        first = next((t for t in turns if t.get("from", t.get("role")) in ("human", "user")), None)
        if first is None:
            raise SpecError(
                f"{field}: a record's conversation has no user turn; set format: problem and "
                "problemField, or use a dataset of prompts"
            )
        return first.get("value", first.get("content")), record.get(spec.answer_field)
    if spec.problem_field not in record:
        raise SpecError(
            f"{field}.problemField: records have no field `{spec.problem_field}` (their fields: "
            f"{sorted(record)}); set problemField to the one holding the problem"
        )
    return record[spec.problem_field], record.get(spec.answer_field)


def load_prompts(spec: DatasetSpec, workspace: Path | None = None, *, field: str = "dataset") -> list[PromptRecord]:
    """Prompts of a dataset as chat messages, with their reference answers when present."""
    out = []
    for i, rec in enumerate(iter_records(spec, workspace, field=field)):
        if spec.max_samples is not None and i >= spec.max_samples:
            break
        if spec.name == "tinymath":
            msgs = tinymath.chat_messages(rec["problem"])
            out.append(PromptRecord(rec["id"], msgs, rec["answer"]))
            continue
        problem, answer = _problem_of(rec, spec, field)
        msgs = [{"role": "user", "content": f"{problem}\n{MATH_INSTRUCTION}"}]
        out.append(PromptRecord(str(rec.get("id", i)), msgs, None if answer is None else str(answer)))
    if not out:
        raise SpecError(
            f"{field}: dataset {spec.name or spec.path} (split {spec.split}) has no records; check `split` and the file"
        )
    return out
