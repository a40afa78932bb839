"""Pre-flight check that a teacher can score a student's tokens.

OPD compares log-probs token by token, so the two models must share the tokenizer (same ids for the
same strings), the special tokens and the chat template; otherwise the teacher scores a different
sequence than the student sampled and training silently goes wrong. This check loads only tokenizers.

The context check (``check_context``, also run by ``opd validate``) refuses settings whose tokens cannot
fit their model's positions (an eval asking for more new tokens than the model holds would otherwise fail
only when eval starts, after SFT and OPD), from the models' configs where this machine has them and from a
table of known models where it has not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import positions
from .positions import known_positions

if TYPE_CHECKING:
    from .spec import DistillationRun

PROBE_MESSAGES = [
    {"role": "user", "content": "What is 12 * 7? Put the final answer in \\boxed{}."},
    {"role": "assistant", "content": "<think>\n12 * 7 = 84\n</think>\n\n\\boxed{84}"},
]
PROBE_TEXT = "Héllo wörld 1234567890 \\frac{1}{2} <think>ok</think> 漢字 🙂"


@dataclass
class Mismatch:
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


class TokenizerMismatch(ValueError):
    def __init__(self, mismatches: list[Mismatch], student: str, teacher: str):
        self.mismatches = mismatches
        lines = "\n".join(f"  - {m}" for m in mismatches)
        super().__init__(
            f"student ({student}) and teacher ({teacher}) cannot be used together for on-policy distillation; "
            f"their tokenizers differ:\n{lines}\nUse a teacher from the same model family, or set "
            "`tokenizer` on both models to the same tokenizer."
        )


def _additional_specials(tok) -> list[str]:
    # transformers 4.x: ``additional_special_tokens``; 5.x dropped it for the ``extra_special_tokens`` list
    # (in 4.x ``extra_special_tokens`` is a dict of named extras, hence the order of the look-ups).
    extra = getattr(tok, "additional_special_tokens", None)
    if extra is None:
        extra = getattr(tok, "extra_special_tokens", None)
    if isinstance(extra, dict):
        extra = list(extra.values())
    return sorted(map(str, extra or []))


def _specials(tok) -> dict[str, object]:
    return {
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "bos_token": tok.bos_token,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "additional_special_tokens": _additional_specials(tok),
    }


def _render(tok, messages, **kw):
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as err:  # a missing or broken template is itself a mismatch to report
        return f"<cannot render: {err}>"


def compare_tokenizers(student_tok, teacher_tok) -> list[Mismatch]:
    out: list[Mismatch] = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))
        only_t = sorted(set(tv) - set(sv))
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])
        parts = [f"sizes {len(sv)} vs {len(tv)}"]
        if only_s:
            parts.append(f"{len(only_s)} tokens only in the student's (e.g. {only_s[:3]})")
        if only_t:
            parts.append(f"{len(only_t)} tokens only in the teacher's (e.g. {only_t[:3]})")
        if moved:
            parts.append(f"{len(moved)} tokens with different ids (e.g. {moved[:3]})")
        out.append(Mismatch("vocabulary", "; ".join(parts)))
    elif student_tok(PROBE_TEXT)["input_ids"] != teacher_tok(PROBE_TEXT)["input_ids"]:
        out.append(Mismatch("tokenization", "the same text encodes to different ids (merges or normalisation differ)"))
    ss, ts = _specials(student_tok), _specials(teacher_tok)
    for key in ss:
        if ss[key] != ts[key]:
            out.append(Mismatch(f"special token {key}", f"student {ss[key]!r}, teacher {ts[key]!r}"))
    s_tpl, t_tpl = student_tok.chat_template, teacher_tok.chat_template
    if (s_tpl is None) != (t_tpl is None):
        which = "student" if s_tpl is None else "teacher"
        out.append(Mismatch("chat template", f"the {which} has none"))
    elif s_tpl is not None:
        for kw in ({"add_generation_prompt": True}, {"add_generation_prompt": False}):
            msgs = PROBE_MESSAGES[:1] if kw["add_generation_prompt"] else PROBE_MESSAGES
            a, b = _render(student_tok, msgs, **kw), _render(teacher_tok, msgs, **kw)
            if a != b:
                out.append(
                    Mismatch("chat template", f"renders differently ({kw}): student {a[:120]!r} vs teacher {b[:120]!r}")
                )
                break
    return out


def check_pair(
    student: str,
    teacher: str,
    *,
    student_tokenizer: str | None = None,
    teacher_tokenizer: str | None = None,
    revision_s: str | None = None,
    revision_t: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Raise TokenizerMismatch naming every difference between the two models' tokenizers."""
    from transformers import AutoTokenizer

    s = AutoTokenizer.from_pretrained(
        student_tokenizer or student, revision=revision_s, trust_remote_code=trust_remote_code
    )
    t = AutoTokenizer.from_pretrained(
        teacher_tokenizer or teacher, revision=revision_t, trust_remote_code=trust_remote_code
    )
    mismatches = compare_tokenizers(s, t)
    if mismatches:
        raise TokenizerMismatch(mismatches, student_tokenizer or student, teacher_tokenizer or teacher)


# --- context lengths: what each stage asks of its models' positions ---------------------------------------


def model_positions(model: str, *, root: Path | None = None, revision: str | None = None) -> tuple[int | None, str]:
    """``max_position_embeddings`` of ``model`` and where it was read: the config of a local directory
    (relative paths against ``root``), of the Hugging Face cache, else ``positions.KNOWN_POSITIONS``;
    (None, why) when none of them knows."""
    path = Path(model).expanduser()
    if not path.is_absolute() and root is not None and model.startswith(("./", "../")):
        path = root / path
    config: Path | None = path / "config.json" if path.is_dir() else None
    if config is None and model.count("/") == 1 and not model.startswith(("./", "../", "/")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
        config = Path(cached) if isinstance(cached, str) else None
    if config is not None and config.is_file():
        values = json.loads(config.read_text())
        held = values.get("max_position_embeddings", values.get("text_config", {}).get("max_position_embeddings"))
        if isinstance(held, int):
            return held, f"its config {config}"
    return known_positions(model)


def context_problems(run: DistillationRun, root: Path | None = None) -> list[str]:
    """``positions.context_problems`` with each model's positions read from its config where this machine
    has it (relative paths against ``root``), else from the known-model table."""
    return positions.context_problems(run, lambda m: model_positions(m.model, root=root, revision=m.revision))


def check_context(run: DistillationRun, root: Path | None = None) -> None:
    """Raise SpecError (exit 2) listing every setting that ``context_problems`` finds."""
    from .spec import SpecError

    problems = context_problems(run, root)
    if problems:
        raise SpecError("\n".join(problems))
