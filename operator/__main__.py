"""``opd-operator`` / ``python -m opd_operator``: run the operator (kopf, standalone: no peering).

By default it serves every namespace, kopf's liveness probe on :8080/healthz and Prometheus metrics on
:8000. Environment: OPD_RESYNC_SECONDS (default 10: how often each run is re-checked without events),
OPD_METRICS_PORT (8000; 0 disables), OPD_WATCH_NAMESPACES (comma-separated; default all).

``python -m opd_operator render FILE.yaml [--namespace NS]`` prints every object the operator would create
for a run instead (see render.py).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["render"]:  # print the objects of a run file instead of running the operator
        from .render import main as render_main

        return render_main(args_in[1:])
    parser = argparse.ArgumentParser(
        prog="opd-operator",
        description=__doc__.splitlines()[0],
        epilog="`opd-operator render FILE.yaml [--namespace NS]` prints, as YAML, every object the operator "
        "would create for that run.",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help="serve only this namespace (repeatable; default: all namespaces)",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="kopf liveness endpoint (empty disables; default %(default)s)",
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default 8000, 0 disables)")
    parser.add_argument("--resync-seconds", type=float, default=None, help="re-check each run this often")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(args_in)
    if args.metrics_port is not None:
        os.environ["OPD_METRICS_PORT"] = str(args.metrics_port)
    if args.resync_seconds is not None:
        os.environ["OPD_RESYNC_SECONDS"] = str(args.resync_seconds)
    namespaces = args.namespace or [n for n in os.environ.get("OPD_WATCH_NAMESPACES", "").split(",") if n]

    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, debug=args.debug)
    kopf.run(
        standalone=True, clusterwide=not namespaces, namespaces=namespaces, liveness_endpoint=args.liveness or None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
