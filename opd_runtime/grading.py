"""Extracting and comparing final answers.

The answer is the content of the last ``\\boxed{...}`` (braces may nest). Integer answers (AIME, tinymath)
compare as integers, so ``\\boxed{025}`` equals 25. General answers use math-verify when it is installed.
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INT = re.compile(r"^[+-]?\d+$")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text``, or None."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end(): i - 1]
    return found


def as_int(text: str) -> int | None:
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    return int(s) if _INT.match(s) else None


def is_correct_integer(completion: str, answer: str | int) -> bool:
    boxed = last_boxed(completion)
    if boxed is None:
        return False
    got, want = as_int(boxed), as_int(str(answer))
    return got is not None and want is not None and got == want
