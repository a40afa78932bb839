"""Final answers: extracting the last boxed answer of a completion, normalising it, and every comparison
that needs no math-verify (``grade_without_verify``). See the package docstring for the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("aime", "math")
MAX_VERIFY_CHARS = 1000  # longer answers (or references) skip math-verify

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_INT = re.compile(r"^[+-]?\d+$")
_INTEGRAL_DECIMAL = re.compile(r"^([+-]?\d+)\.0*$")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text`` (the complete one that starts last), or None.

    One pass over the braces with a stack, so unbalanced or adversarial text costs linear time.
    """
    openers = {m.end() - 1 for m in _BOXED.finditer(text)}
    if not openers:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    for m in _BRACE.finditer(text):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            start = stack.pop()
            if start in openers and (best is None or start > best[0]):
                best = (start, i)
    return None if best is None else text[best[0] + 1 : best[1]]


def as_int(text: str) -> int | None:
    """The integer a short answer denotes (``025``, ``1,000``, ``\\text{25}``, ``25.0``), else None."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    if _INT.match(s):
        return int(s)
    m = _INTEGRAL_DECIMAL.match(s)
    return int(m.group(1)) if m else None


def is_correct_integer(completion: str, answer: str | int) -> bool:
    boxed = last_boxed(completion)
    if boxed is None:
        return False
    got, want = as_int(boxed), as_int(str(answer))
    return got is not None and want is not None and got == want


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|\\left|\\right|\\displaystyle")


def normalize(answer: str) -> str:
    """A canonical string for comparing answers and counting votes: integers as ``str(int)``, otherwise
    without ``$``, spacing commands, ``\\left``/``\\right``, ``\\text{}`` wrappers, whitespace and a
    trailing period, with ``\\dfrac``/``\\tfrac`` as ``\\frac``."""
    n = as_int(answer) if len(answer) < 100 else None
    if n is not None:
        return str(n)
    s = answer.replace("$", "")
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = "".join(s.split()).rstrip(".")
    return s


def gold_answer(answer) -> str:
    """A reference answer as text; a reference written as a solution with a boxed answer gives the box."""
    text = str(answer)
    boxed = last_boxed(text) if "\\boxed" in text or "\\fbox" in text else None
    return boxed if boxed is not None else text


@dataclass(frozen=True)
class Graded:
    correct: bool
    extracted: str | None  # content of the last complete \boxed{}, None when there is none
    key: str | None  # normalised answer (what majority voting counts), None when there is none
    method: str  # none | integer | string | math-verify | timeout | error | unavailable | too-long


@dataclass(frozen=True)
class Pending:
    """A comparison that only math-verify can decide: the extracted answer, its key and the reference."""

    extracted: str
    key: str
    gold: str


def grade_without_verify(completion: str, answer, kind: str) -> Graded | Pending:
    """Everything that needs no math-verify; a ``Pending`` when math-verify must decide."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    extracted = last_boxed(completion)
    if extracted is None:
        return Graded(False, None, None, "none")
    gold = gold_answer(answer)
    key = normalize(extracted)
    want = as_int(gold) if len(gold) < 100 else None
    if want is not None:
        got = as_int(extracted) if len(extracted) < 100 else None
        if got is not None or kind == "aime":
            return Graded(got == want, extracted, key, "integer")
    if key == normalize(gold):
        return Graded(True, extracted, key, "string")
    if len(extracted) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return Graded(False, extracted, key, "too-long")
    return Pending(extracted, key, gold)
