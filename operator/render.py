"""``python -m opd_operator render FILE.yaml [--namespace NS]``: every object the operator would create for
a run, as YAML, without a cluster.

The objects come from the reconciler itself: ``reconcile.decide`` is played against an imagined cluster in
which each Job it creates succeeds and the teacher Deployment becomes Available, until the run is
Succeeded. Whatever the operator creates (plumbing, each stage's first attempt, the teacher Deployment
and Service, and anything a later change adds to ``decide``) is therefore what is printed, in creation
order. For review, GitOps diffs and debugging; ``kubectl apply --dry-run=server -f -`` accepts the output.

The run's ``metadata.uid`` (the owner of every object) exists only once the run is created: a file
without one gets a placeholder uid. A run with ``suspend: true`` is rendered as it runs once resumed.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from opd_runtime.contract import KIND
from opd_runtime.spec import SpecError, parse_run

from . import children
from .observe import observe
from .reconcile import decide

Manifest = dict[str, Any]
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
DEFAULT_NAMESPACE = "default"
# Reconciles to play before giving up: each stage takes at most three (create, observe done, move on).
MAX_RECONCILES = 64
_NOW = datetime(2026, 1, 1, tzinfo=UTC)  # only timestamps in the status depend on it, never an object


def _as_done(manifest: Manifest) -> Manifest:
    """The object as the imagined cluster reports it: Jobs complete, the teacher Deployment Available."""
    obj = copy.deepcopy(manifest)
    obj["metadata"].setdefault("generation", 1)
    if obj["kind"] == "Job":
        obj["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    elif obj["kind"] == "Deployment":
        replicas = obj["spec"].get("replicas", 1)
        obj["status"] = {
            "observedGeneration": obj["metadata"]["generation"],
            "availableReplicas": replicas,
            "readyReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True"}],
        }
    return obj


def run_object(doc: Manifest, namespace: str | None) -> Manifest:
    """The DistillationRun as the API server would hold it: namespaced, with a uid and a generation."""
    obj = copy.deepcopy(doc)
    meta = obj.setdefault("metadata", {})
    meta["namespace"] = namespace or meta.get("namespace") or DEFAULT_NAMESPACE
    meta.setdefault("uid", PLACEHOLDER_UID)
    meta.setdefault("generation", 1)
    obj.pop("status", None)
    # A suspended run gets only its plumbing until resumed; render shows what it runs once it is resumed.
    # (suspend is an operational field: no object's content depends on it.)
    if isinstance(obj.get("spec"), dict):
        obj["spec"]["suspend"] = False
    return obj


def render(doc: Manifest, namespace: str | None = None) -> list[Manifest]:
    """Every object the operator creates for run ``doc``, in creation order, as if each stage succeeded.

    Raises SpecError, naming the fields, for a spec the operator would refuse (the run would fail as
    InvalidSpec and create nothing).
    """
    obj = run_object(doc, namespace)
    name = obj["metadata"].get("name") or "run"
    run = parse_run(obj, source=f"DistillationRun {name}")
    problems = children.cluster_problems(run)
    if problems:
        raise SpecError(f"DistillationRun {name}: cannot run on Kubernetes:\n" + "\n".join(problems))
    cluster: dict[tuple[str, str], Manifest] = {}
    created: list[Manifest] = []
    for _ in range(MAX_RECONCILES):
        by_kind: dict[str, list[Manifest]] = {}
        for (kind, _name), child in cluster.items():
            by_kind.setdefault(kind, []).append(child)
        decision = decide(obj, observe(name, by_kind), _NOW)
        obj["status"] = decision.status
        for action in decision.actions:
            key = (action.kind, action.name)
            if action.verb == "create" and action.body is not None and key not in cluster:
                created.append(copy.deepcopy(action.body))
                cluster[key] = _as_done(action.body)
            elif action.verb == "delete":
                cluster.pop(key, None)
        if decision.status.get("phase") in ("Succeeded", "Failed"):
            return created
    raise RuntimeError(f"render: the run did not finish within {MAX_RECONCILES} reconciles")  # a bug in decide


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the run file in the spec ConfigMap) as literal blocks, readable in a diff."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[Manifest]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="opd-operator render",
        description="Print, as YAML, every object the operator would create for the DistillationRun in FILE "
        "(all stages, as if each earlier stage had succeeded).",
    )
    parser.add_argument("file", help="a YAML file holding one DistillationRun")
    parser.add_argument(
        "-n", "--namespace", default=None, help="namespace (default: the file's metadata.namespace, else default)"
    )
    args = parser.parse_args(argv)
    try:
        docs = [d for d in yaml.safe_load_all(Path(args.file).read_text()) if d is not None]
        runs = [d for d in docs if isinstance(d, dict) and d.get("kind", KIND) == KIND]
        if len(runs) != 1:
            raise SpecError(f"{args.file}: expected exactly one {KIND} document, found {len(runs)}")
        objects = render(runs[0], args.namespace)
    except (OSError, yaml.YAMLError) as err:
        print(f"render: {args.file}: {err}", file=sys.stderr)
        return 2
    except SpecError as err:
        print(f"render: {err}", file=sys.stderr)
        return 2
    if objects and objects[0]["metadata"].get("ownerReferences", [{}])[0].get("uid") == PLACEHOLDER_UID:
        print(f"# ownerReferences carry the placeholder uid {PLACEHOLDER_UID}: the operator sets the run's own")
    sys.stdout.write(to_yaml(objects))
    return 0
