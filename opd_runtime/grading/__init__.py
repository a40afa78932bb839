"""Grading completions: extracting and comparing final answers.

``answers`` extracts and compares without math-verify, ``verify_pool`` runs math-verify, ``files`` grades
a JSON-lines file (``opd grade``); ``grade_many`` and ``grade`` here put them together.

The answer is the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``; braces may nest).
A completion without one is wrong, never an error.

Two kinds of comparison (``kind``):

- ``aime``: integer answers compare as integers, so ``\\boxed{025}`` equals 25. A numeral whose value is
  an integer also counts (``25.0`` and ``25.00`` equal 25; ``25.5`` does not), as do thousands separators
  and ``\\text{25}``. Anything else in the box (``\\frac{50}{2}``, ``x=25``) is wrong. A reference answer
  that is not an integer is compared the ``math`` way.
- ``math``: equal integers or equal normalised strings are correct at once; otherwise math-verify decides
  (``verify(gold, answer)``, gold first) whether the two are the same mathematical object (1/2 = \\frac12
  = 0.5, sets, intervals, equations...). When math-verify is not installed or raises, the normalised
  string comparison stands.

Grading never hangs and never crashes on garbage. math-verify runs with its own (``signal.alarm``)
timeouts off, in worker processes (``verify_pool``, ``worker.py``) that are killed when a comparison
exceeds its time limit (``timeout_s``); a comparison that times out, or kills its worker, is graded wrong.
Answers longer than ``answers.MAX_VERIFY_CHARS`` are compared as strings only. Extraction is linear in the text length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .answers import Graded, Pending, grade_without_verify
from .verify_pool import DEFAULT_TIMEOUT_S, VerifyPool, shared_pool


def grade_many(
    items: Iterable[Sequence],
    kind: str = "math",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
    pool: VerifyPool | None = None,
) -> list[Graded]:
    """Grade ``(completion, answer)`` or ``(completion, answer, kind)`` items (``kind`` is the default),
    with the extracted answer and how each verdict was reached."""
    fast: list[Graded | Pending] = []
    for item in items:
        completion, answer, *rest = item
        fast.append(grade_without_verify(completion, answer, rest[0] if rest and rest[0] else kind))
    # (gold, extracted) -> index of its first occurrence; identical comparisons run once
    todo: dict[tuple[str, str], int] = {}
    for g in fast:
        if isinstance(g, Pending):
            todo.setdefault((g.gold, g.extracted), len(todo))
    verdicts: list[tuple[bool | None, str]] = []
    if todo:
        verdicts = (pool or shared_pool(workers)).compare(list(todo), timeout_s)
    out = []
    for g in fast:
        if isinstance(g, Pending):
            ok, method = verdicts[todo[(g.gold, g.extracted)]]
            # fallback: the normalised strings, which already differ (else no math-verify was needed)
            out.append(Graded(bool(ok), g.extracted, g.key, method))
        else:
            out.append(g)
    return out


def grade(completion: str, answer, kind: str = "math", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Graded:
    """Is the last boxed answer of ``completion`` the reference ``answer``? (``.correct``; see above.)"""
    return grade_many([(completion, answer)], kind, timeout_s=timeout_s)[0]
