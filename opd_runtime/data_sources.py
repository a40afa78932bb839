"""Problem sets: where prompts (and reference answers) come from.

Sources, chosen by a ``DatasetSpec``: the built-in sets (``tinymath``, ``aime24`` and ``gsm8k``, the latter
two shipped with the package, provenance in ``opd_runtime/data/PROVENANCE.md``), a local .jsonl/.parquet
file, or a Hugging Face hub dataset by name (streamed, via the optional ``datasets`` package).

Whatever the source, records pass the spec's ``filter`` (field equality), then its seeded ``shuffle``
(a streaming buffer, so a hub dataset is never held whole), then ``maxSamples``. Conversations get the
spec's ``instruction`` and ``systemPrompt`` by one function (``with_prompt_fields``), so SFT traces, OPD
prompts and eval problems are worded alike.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import tinymath
from .spec import DatasetSpec, SpecError
from .spec.models import MATH_INSTRUCTION

BUILTIN_FILES = {"aime24": "aime24.jsonl", "gsm8k": "gsm8k_test.jsonl"}
TINYMATH_SIZES = {"train": 50_000, "test": 500}


@dataclass(frozen=True)
class PromptRecord:
    id: str
    messages: list[dict[str, str]]
    answer: str | None


def _read_local(path: Path, field: str) -> Iterator[dict[str, Any]]:
    if path.is_dir():
        raise SpecError(f"{field}.path: {path} is a directory; point `path` at a .jsonl or .parquet file")
    try:
        yield from _read_file(path, field)
    except (OSError, UnicodeDecodeError) as err:
        # unreadable, not a transient failure: retrying the stage would fail the same way
        raise SpecError(
            f"{field}.path: cannot read {path} ({err}); fix the file or point `path` at another one"
        ) from None


def _read_file(path: Path, field: str) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SpecError(
                            f"{field}.path: line {n} of {path} is not JSON ({err}); fix the file "
                            "or point `path` at another one"
                        ) from None
                    if not isinstance(record, dict):
                        raise SpecError(
                            f"{field}.path: line {n} of {path} is a JSON {type(record).__name__}, not an object "
                            "of fields; fix the file or point `path` at another one"
                        )
                    yield record
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        raise SpecError(f"{field}.path: {path} is neither a .jsonl nor a .parquet file; convert it to one of them")


def iter_records(
    spec: DatasetSpec, workspace: Path | None = None, *, field: str = "dataset"
) -> Iterator[dict[str, Any]]:
    """Records of a dataset spec (before format handling) after its ``filter`` and ``shuffle``; ``field`` is
    the spec's path in the run file (e.g. ``spec.sft.dataset``), which configuration errors name."""
    records = _source_records(spec, workspace, field)
    if spec.filter:
        records = (r for r in records if matches(r, spec.filter))
    if spec.shuffle:
        records = buffer_shuffle(records, spec.shuffle_buffer, spec.seed)
    return records


def _as_text(value: Any) -> str:
    """A filter value or record field as text: strings as they are, numbers and booleans as JSON writes them."""
    return value if isinstance(value, str) else json.dumps(value)


def matches(record: dict[str, Any], want: dict[str, Any]) -> bool:
    """Does ``record`` have every field of ``want`` with that value? (``2`` matches ``"2"``; a YAML manifest
    and a parquet column may type one value differently.)"""
    return all(k in record and _as_text(record[k]) == _as_text(v) for k, v in want.items())


def buffer_shuffle(items: Iterable[Any], buffer: int, seed: int) -> Iterator[Any]:
    """``items`` in a seeded random order, holding at most ``buffer`` of them: each new item takes the place
    of a randomly chosen held one, which is emitted (a full shuffle when everything fits in the buffer)."""
    rng = random.Random(f"shuffle/{seed}")
    held: list[Any] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        i = rng.randrange(buffer)
        yield held[i]
        held[i] = item
    rng.shuffle(held)
    yield from held


def _source_records(spec: DatasetSpec, workspace: Path | None, field: str) -> Iterator[dict[str, Any]]:
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
        not_found = getattr(getattr(datasets, "exceptions", None), "DatasetNotFoundError", None)
        try:
            stream = datasets.load_dataset(spec.name, split=spec.split, streaming=True)
        except Exception as err:
            # a name the hub does not have fails every retry alike; a network failure stays retryable (exit 1)
            if not_found is not None and isinstance(err, not_found):
                raise SpecError(
                    f"{field}.name: the Hugging Face hub has no dataset {spec.name!r} this machine may read "
                    f"({err}); fix the name, log in for a gated one (HF_TOKEN), or use a local `path`"
                ) from None
            raise
        yield from stream


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


def with_prompt_fields(messages: list[dict[str, str]], spec: DatasetSpec, *, default_instruction: str) -> list[dict]:
    """``messages`` as the dataset's ``instruction`` and ``systemPrompt`` ask: the instruction appended to the
    first user turn after a newline (``default_instruction`` when the spec leaves it empty, nothing when it
    is ``""``), and the system prompt as the first message in place of the conversation's own."""
    instruction = default_instruction if spec.instruction is None else spec.instruction
    out = [dict(m) for m in messages]
    if instruction:
        first = next((m for m in out if m["role"] == "user"), None)
        if first is not None:
            first["content"] = f"{first['content']}\n{instruction}"
    if spec.system_prompt is not None:
        out = [m for m in out if m["role"] != "system"]
        if spec.system_prompt:
            out.insert(0, {"role": "system", "content": spec.system_prompt})
    return out


def prompt_instruction(spec: DatasetSpec) -> str:
    """The instruction a problem set's prompts get when the spec sets none: the recipe's, except for tinymath,
    whose tiny world is trained on bare problems."""
    return "" if spec.name == "tinymath" else MATH_INSTRUCTION


def load_prompts(spec: DatasetSpec, workspace: Path | None = None, *, field: str = "dataset") -> list[PromptRecord]:
    """Prompts of a dataset as chat messages, with their reference answers when present."""
    out = []
    default = prompt_instruction(spec)
    for i, rec in enumerate(iter_records(spec, workspace, field=field)):
        if spec.max_samples is not None and i >= spec.max_samples:
            break
        if spec.name == "tinymath":
            msgs = with_prompt_fields(tinymath.chat_messages(rec["problem"]), spec, default_instruction=default)
            out.append(PromptRecord(rec["id"], msgs, rec["answer"]))
            continue
        problem, answer = _problem_of(rec, spec, field)
        msgs = with_prompt_fields([{"role": "user", "content": problem}], spec, default_instruction=default)
        out.append(PromptRecord(str(rec.get("id", i)), msgs, None if answer is None else str(answer)))
    if not out:
        kept = f" with filter {spec.filter}" if spec.filter else ""
        raise SpecError(
            f"{field}: dataset {spec.name or spec.path} (split {spec.split}) has no records{kept}; check "
            f"`split`{', `filter`' if spec.filter else ''} and the file"
        )
    return out
