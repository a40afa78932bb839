"""``opd grade``: grading a JSON-lines file of completions, one result line per input line."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from . import grade_many
from .answers import KINDS
from .verify_pool import DEFAULT_TIMEOUT_S


class GradeInputError(ValueError):
    """A grading input file that cannot be used; the message names the file and line."""


def read_grade_file(path: str | Path, default_kind: str = "math") -> list[tuple[int, str, str, str]]:
    """(line number, completion, answer, kind) for every non-blank line of a JSON-lines file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as err:
        raise GradeInputError(f"{path}: cannot read: {err}") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise GradeInputError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(rec, dict):
            raise GradeInputError(
                f"{where}: expected a JSON object with `completion` and `answer`, got {type(rec).__name__}"
            )
        for name in ("completion", "answer"):
            if name not in rec:
                raise GradeInputError(
                    f"{where}: missing field `{name}` (each line needs `completion` and `answer`, and may set `kind`)"
                )
        if not isinstance(rec["completion"], str):
            raise GradeInputError(f"{where}: `completion` must be a string, got {type(rec['completion']).__name__}")
        answer = rec["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise GradeInputError(f"{where}: `answer` must be a string or a number, got {json.dumps(answer)}")
        kind = rec.get("kind") or default_kind
        if kind not in KINDS:
            raise GradeInputError(f"{where}: `kind` must be one of {', '.join(KINDS)}, got {kind!r}")
        out.append((n, rec["completion"], str(answer), kind))
    if not out:
        raise GradeInputError(f"{path}: no lines to grade")
    return out


def grade_file(
    path: str | Path,
    *,
    default_kind: str = "math",
    output: str | Path | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
) -> dict:
    """Grade a JSON-lines file; with ``output``, write one result line per input line."""
    rows = read_grade_file(path, default_kind)
    graded = grade_many([(c, a, k) for _, c, a, k in rows], default_kind, timeout_s=timeout_s, workers=workers)
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            for (n, _, answer, kind), g in zip(rows, graded):
                f.write(json.dumps({"line": n, "answer": answer, "kind": kind, **asdict(g)}) + "\n")
        os.replace(tmp, out)
    correct = sum(g.correct for g in graded)
    return {"correct": correct, "total": len(graded), "accuracy": correct / len(graded)}
