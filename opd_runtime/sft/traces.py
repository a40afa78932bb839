"""Chat traces for SFT: OpenThoughts3 (``conversations`` of ``{from, value}``), generic chat JSONL
(``messages`` of ``{role, content}``) and tinymath traces, all turned into role/content messages.

Loss goes on the final assistant turn (a reasoning trace); earlier turns are context. The dataset's
``instruction`` (empty by default: traces are kept as recorded) and ``systemPrompt`` shape the context as
they shape OPD and eval prompts (``data_sources.with_prompt_fields``). The prompt is
rendered with the chat template's generation prompt and the answer is appended as raw text plus the
end-of-turn token, which is exactly the layout the sampler produces during OPD and evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import tinymath
from ..data_sources import iter_records, with_prompt_fields
from ..spec import SpecError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Trace:
    id: str
    messages: list[dict]


def _messages(record: dict, fmt: str) -> list[dict]:
    if fmt == "openthoughts" or (fmt == "auto" and "conversations" in record):
        turns = record["conversations"]
        return [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]
    if fmt == "chat" or (fmt == "auto" and "messages" in record):
        return [{"role": ROLES.get(m["role"], m["role"]), "content": m["content"]} for m in record["messages"]]
    raise ValueError(
        f"record has neither `conversations` nor `messages` (fields: {sorted(record)}); set the dataset's format"
    )


def load_traces(spec, workspace: Path | None = None, *, field: str = "spec.sft.dataset") -> Iterator[Trace]:
    n = 0
    for i, rec in enumerate(iter_records(spec, workspace, field=field)):
        if spec.max_samples is not None and n >= spec.max_samples:
            return
        if spec.name == "tinymath":
            msgs = tinymath.chat_messages(rec["problem"], rec["solution"])
        else:
            try:
                msgs = _messages(rec, spec.format)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                # the data does not fit the spec: retrying the stage would fail the same way
                raise SpecError(
                    f"{field}: record {i} ({rec.get('id', 'no id')}) is not a chat trace the format "
                    f"`{spec.format}` reads ({type(err).__name__}: {err}); set `format` to the file's layout "
                    "(openthoughts: conversations of {from, value}; chat: messages of {role, content}) or fix it"
                ) from None
        if not msgs or msgs[-1]["role"] != "assistant":
            continue  # nothing to learn from
        msgs = with_prompt_fields(msgs[:-1], spec, default_instruction="") + msgs[-1:]
        n += 1
        yield Trace(str(rec.get("id", i)), msgs)


def tokenize(tokenizer, trace: Trace, max_seq_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids), the completion truncated so the whole fits ``max_seq_length``."""
    from ..training.batches import completion_ids, prompt_ids

    prompt = prompt_ids(tokenizer, trace.messages[:-1])
    completion = completion_ids(tokenizer, trace.messages[-1]["content"])
    room = max(0, max_seq_length - len(prompt))
    return prompt[:max_seq_length], completion[:room]
