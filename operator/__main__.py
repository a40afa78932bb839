"""``opd-operator`` / ``python -m opd_operator``: run the operator (kopf, standalone: no kopf peering).

By default it serves every namespace, kopf's liveness probe on :8080/healthz and Prometheus metrics on
:8000. Environment: OPD_RESYNC_SECONDS (default 60: how often each run is re-checked when no event on
it or its children wakes it), OPD_METRICS_PORT (8000; 0 disables), OPD_WATCH_NAMESPACES
(comma-separated; default all), OPD_LEADER_ELECT (``true`` = ``--leader-elect``).

With ``--leader-elect`` (the chart's default) several replicas may run: each waits for the Lease
``--leader-elect-resource-name`` in ``--leader-elect-resource-namespace`` (default: the pod's own
namespace) and only its holder starts kopf; see leader.py. A standby serves /healthz and /metrics
(``opd_operator_leader 0``) and makes no request but reading the Lease.

``python -m opd_operator render FILE.yaml [--namespace NS]`` prints every object the operator would create
for a run instead (see render.py).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from opd_runtime.contract import CONTROLLER_NAME_PATTERN

if TYPE_CHECKING:
    from . import leader as leader_types


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
    parser.add_argument(
        "--ttl-seconds-after-finished",
        type=int,
        default=None,
        help="delete a finished run's children this many seconds after it finished, for runs whose "
        "spec.ttlSecondsAfterFinished is unset (default: $OPD_TTL_SECONDS_AFTER_FINISHED, else keep them)",
    )
    parser.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("OPD_LEADER_ELECT", "").lower() in ("1", "true", "yes"),
        help="act only while holding a coordination.k8s.io Lease, so replicas can stand by (default: "
        "$OPD_LEADER_ELECT, else off)",
    )
    parser.add_argument("--leader-elect-resource-name", default="opd-operator", help="the Lease's name")
    parser.add_argument(
        "--leader-elect-resource-namespace",
        default=None,
        help="the Lease's namespace (default: $POD_NAMESPACE, else the in-cluster ServiceAccount's)",
    )
    parser.add_argument(
        "--leader-elect-lease-duration",
        type=float,
        default=15.0,
        help="seconds a standby waits after the leader's last renewal before it takes over (default 15)",
    )
    parser.add_argument(
        "--leader-elect-renew-deadline",
        type=float,
        default=10.0,
        help="seconds the leader keeps acting without a successful renewal before it exits (default 10)",
    )
    parser.add_argument(
        "--leader-elect-retry-period",
        type=float,
        default=2.0,
        help="seconds between Lease renewals and between a standby's attempts (default 2)",
    )
    parser.add_argument(
        "--controller-name",
        default=None,
        help="act only on runs whose spec.managedBy is this name; runs without one belong to the default "
        "name (default: $OPD_CONTROLLER_NAME, else opd.dev/operator)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(args_in)
    if args.metrics_port is not None:
        os.environ["OPD_METRICS_PORT"] = str(args.metrics_port)
    if args.resync_seconds is not None:
        os.environ["OPD_RESYNC_SECONDS"] = str(args.resync_seconds)
    if args.ttl_seconds_after_finished is not None:
        if args.ttl_seconds_after_finished < 0:
            parser.error("--ttl-seconds-after-finished: a number of seconds, 0 or more")
        os.environ["OPD_TTL_SECONDS_AFTER_FINISHED"] = str(args.ttl_seconds_after_finished)
    if args.controller_name is not None:
        if not re.match(CONTROLLER_NAME_PATTERN, args.controller_name):
            parser.error(
                f"--controller-name {args.controller_name!r}: a domain-prefixed path such as "
                "example.com/opd-team-a (what spec.managedBy names)"
            )
        os.environ["OPD_CONTROLLER_NAME"] = args.controller_name
    namespaces = args.namespace or [n for n in os.environ.get("OPD_WATCH_NAMESPACES", "").split(",") if n]

    settings = lease_settings(args, parser) if args.leader_elect else None  # bad flags fail before anything runs

    import kopf

    from . import handlers, leader, metrics

    kopf.configure(verbose=args.verbose, debug=args.debug)
    elector = None
    if settings is not None:
        elector = leader.LeaderElector(settings)
        if handlers.METRICS_PORT:  # a standby shows opd_operator_leader 0 and its (read-only) requests
            metrics.serve(handlers.METRICS_PORT)
        with standby_health(args.liveness):
            elector.acquire()
        leader.set_current(elector)
        elector.start_renewing()
    else:
        metrics.LEADER.set(1)
    try:
        kopf.run(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness or None,
        )
    finally:
        if elector is not None:  # kopf has stopped: nothing acts any more, the next replica may
            elector.release()
    return 0


def lease_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> leader_types.LeaseSettings:
    from .leader import LeaseSettings, default_namespace

    namespace = args.leader_elect_resource_namespace or default_namespace()
    if not namespace:
        parser.error(
            "--leader-elect needs the Lease's namespace: pass --leader-elect-resource-namespace or set "
            "POD_NAMESPACE (the chart sets it from the downward API)"
        )
    try:
        return LeaseSettings(
            namespace=namespace,
            name=args.leader_elect_resource_name,
            lease_duration=args.leader_elect_lease_duration,
            renew_deadline=args.leader_elect_renew_deadline,
            retry_period=args.leader_elect_retry_period,
        )
    except ValueError as err:
        parser.error(str(err))


@contextlib.contextmanager
def standby_health(liveness: str) -> Iterator[None]:
    """While a replica waits for the Lease, answer its liveness probe (kopf's endpoint starts with kopf)."""
    if not liveness:
        yield
        return
    url = urllib.parse.urlsplit(liveness)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == (url.path or "/")
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"standby: waiting for the leader-election Lease\n" if ok else b"")

        def log_message(self, *_: Any) -> None:  # no line per probe
            pass

    server = http.server.ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), Health)
    thread = threading.Thread(target=server.serve_forever, name="standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()  # kopf binds the same port next


if __name__ == "__main__":
    sys.exit(main())
