"""SFT traces kept on disk, not in memory: one JSON line per trace and an index of byte offsets.

The recipe's SFT set is ~400k OpenThoughts3 traces of up to 16k tokens each, far more text than a
trainer should hold. The dataset is streamed once (hub datasets with ``streaming=True``) into
``<workspace>/data/sft-traces-<key>.jsonl``; training then reads the traces it needs by offset, so the
seeded order and an exact resume work as with an in-memory list. The key hashes the dataset spec, so an
edited dataset section writes a new file, and a finished file is reused by retries and resumed runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

from .traces import Trace


class TraceStore(Sequence[Trace]):
    def __init__(self, path: Path):
        self.path = path
        offsets = array("q")
        with path.open("rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self._offsets = offsets
        self._file = path.open("rb")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        self._file.seek(self._offsets[i])
        rec = json.loads(self._file.readline())
        return Trace(rec["id"], rec["messages"])


def store_path(dataset_spec, workspace: Path) -> Path:
    key = hashlib.sha256(dataset_spec.model_dump_json().encode()).hexdigest()[:12]
    return workspace / "data" / f"sft-traces-{key}.jsonl"


def write_store(traces: Iterable[Trace], path: Path) -> int:
    """Write ``traces`` to ``path`` atomically (a partial file is never mistaken for a finished one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with tmp.open("w") as f:
        for t in traces:
            f.write(json.dumps({"id": t.id, "messages": t.messages}, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
