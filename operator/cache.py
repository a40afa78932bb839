"""A run's children as the operator's watches last saw them, with its own recent writes laid over them.

kopf indexes every labelled child of the kinds in ``observe.KINDS`` by run (handlers.run_children), fed
by watch streams, so a reconcile woken by an event reads the children from memory instead of a LIST per kind.
A watch event arrives some milliseconds after the write that caused it, and the reconcile that the
operator's own status patch wakes would otherwise read the cluster as it was before its last round:
a Job it just created would look lost and be counted as a failure. So ``Overlay`` remembers this
process's creates and deletes per run and lays them over the index until the index shows them (or
60 s pass): a created object is shown as created, a deleted one as being deleted, as a LIST would.
Patches need nothing: the reconciler's patches are idempotent, and one stale read repeats one.

The periodic resync still LISTs (handlers.reconcile_run), so whatever the watches might have missed
is corrected within one resync period; the overlay of a run is dropped after each LIST.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from .observe import KINDS
from .walk import Action, rfc3339

Manifest = dict[str, Any]
Children = dict[str, list[Manifest]]  # kind -> objects, as kube.list_children returns
PENDING_SECONDS = 60.0  # an own write the watch never confirms stops being laid over after this


def from_index(entries: Iterable[Mapping[str, Any]]) -> Children:
    """The index's values of one run (``{"kind": ..., "body": ...}`` each) grouped by kind."""
    found: Children = {kind: [] for kind in KINDS}
    for entry in entries:
        found.setdefault(entry["kind"], []).append(entry["body"])
    return found


class Overlay:
    """This process's creates and deletes per run that the watches may not have shown yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (namespace, run) -> (kind, name) -> (monotonic time, the created body, or None for a delete)
        self._pending: dict[tuple[str, str], dict[tuple[str, str], tuple[float, Manifest | None]]] = {}

    def record(self, namespace: str, run: str, action: Action) -> None:
        if action.verb not in ("create", "delete") or action.kind not in KINDS:
            return
        body = copy.deepcopy(action.body) if action.verb == "create" else None
        if body is not None:  # what the API server would have added that the reconciler reads
            body["metadata"].setdefault("creationTimestamp", rfc3339(datetime.now(UTC)))
        with self._lock:
            self._pending.setdefault((namespace, run), {})[action.kind, action.name] = (time.monotonic(), body)

    def forget(self, namespace: str, run: str) -> None:
        """After a LIST (the truth) or when the run is gone."""
        with self._lock:
            self._pending.pop((namespace, run), None)

    def apply(self, namespace: str, run: str, found: Children) -> Children:
        """``found`` (from the index) with the pending writes laid over it; confirmed ones are dropped."""
        now = time.monotonic()
        out = {kind: list(objs) for kind, objs in found.items()}
        with self._lock:
            pending = self._pending.get((namespace, run), {})
            for key, (since, body) in list(pending.items()):
                kind, name = key
                objs = out.setdefault(kind, [])
                at = next((i for i, o in enumerate(objs) if o["metadata"]["name"] == name), None)
                if now - since > PENDING_SECONDS:
                    del pending[key]
                elif body is not None:  # created by us
                    if at is None:
                        objs.append(body)
                    else:
                        del pending[key]  # the index shows it
                elif at is None or objs[at]["metadata"].get("deletionTimestamp"):
                    del pending[key]  # deleted by us, and the index shows it gone or going
                else:  # still listed as it was: show it as a LIST would, being deleted
                    going = copy.deepcopy(objs[at])
                    going["metadata"]["deletionTimestamp"] = rfc3339(datetime.now(UTC))
                    objs[at] = going
        return out


OVERLAY = Overlay()
