"""tinymath: a synthetic multi-step arithmetic task with worked reasoning.

A problem is a chain of integer operations read left to right ("Start with 7, add 5, multiply by 3,
then subtract 4."). The reference solution shows one line per operation inside a ``<think>`` block and
ends with ``\\boxed{answer}``, the format of a reasoning model's trace. Problems are assigned to the
train or test split by a hash of their content, so the splits never overlap whatever the seed or size.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

SPLITS = ("train", "test")
# One problem in TEST_SHARE lands in the test split.
TEST_SHARE = 8

_VERBS = {"+": "add {n}", "-": "subtract {n}", "*": "multiply by {n}"}
MAX_VALUE = 999  # values stay below this; difficulty <= 2 keeps them under 100


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    solution: str
    difficulty: int

    def to_json(self) -> dict:
        return asdict(self)


def operation_count(difficulty: int) -> int:
    """Difficulty 1 is two operations; each level adds one."""
    return difficulty + 1


def operand_max(difficulty: int) -> int:
    return 9 if difficulty <= 2 else 19


def value_max(difficulty: int) -> int:
    return 99 if difficulty <= 2 else MAX_VALUE


def _split_of(key: str) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    return "test" if digest[0] % TEST_SHARE == 0 else "train"


def _chain(rng: random.Random, difficulty: int) -> tuple[int, list[tuple[str, int]]]:
    hi = operand_max(difficulty)
    start = rng.randint(1, hi)
    value = start
    ops: list[tuple[str, int]] = []
    while len(ops) < operation_count(difficulty):
        op, n = rng.choice("+-*"), rng.randint(1 if rng.random() < 0.9 else 0, hi)
        nxt = value + n if op == "+" else value - n if op == "-" else value * n
        if 0 <= nxt <= value_max(difficulty):
            ops.append((op, n))
            value = nxt
    return start, ops


def render(start: int, ops: list[tuple[str, int]], difficulty: int, index: int) -> Problem:
    clauses = [_VERBS[op].format(n=n) for op, n in ops]
    text = f"Start with {start}, " + ", ".join(clauses) + "."
    lines, value = [], start
    for op, n in ops:
        nxt = value + n if op == "+" else value - n if op == "-" else value * n
        lines.append(f"{value} {op} {n} = {nxt}")
        value = nxt
    solution = "<think>\n" + "\n".join(lines) + f"\n</think>\n\n\\boxed{{{value}}}"
    return Problem(
        id=f"tinymath-d{difficulty}-{index}", problem=text, answer=str(value), solution=solution, difficulty=difficulty
    )


def generate(n: int, *, split: str = "train", seed: int = 0, difficulty: int = 2) -> list[Problem]:
    """``n`` distinct problems of ``split``; the same arguments always give the same list."""
    if split not in SPLITS:
        raise ValueError(f"tinymath split must be one of {SPLITS}, got {split!r}")
    if difficulty < 1:
        raise ValueError(f"tinymath difficulty must be >= 1, got {difficulty}")
    rng = random.Random(f"tinymath/{split}/{seed}/{difficulty}")
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"tinymath: cannot find {n} distinct {split} problems at difficulty {difficulty}")
        start, ops = _chain(rng, difficulty)
        key = f"{start}|" + "|".join(f"{op}{k}" for op, k in ops)
        if key in seen or _split_of(key) != split:
            continue
        seen.add(key)
        out.append(render(start, ops, difficulty, len(out)))
    return out


def chat_messages(problem: str, solution: str | None = None) -> list[dict]:
    """The conversation used for prompts (no solution) and for SFT traces (with one)."""
    msgs = [{"role": "user", "content": problem}]
    if solution is not None:
        msgs.append({"role": "assistant", "content": solution})
    return msgs
