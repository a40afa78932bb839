"""A math-verify worker process for ``opd_runtime.grading.verify_pool`` (run as a script; imports nothing
of opd).

Protocol, one JSON object per line: it first writes ``{"ready": true}`` (or false when math-verify cannot
be imported), then answers every request ``{"gold", "pred", "alarm"}`` on stdin with ``{"ok": true|false}``,
or ``{"ok": null, "error": ...}`` when math-verify raised. math-verify's own signal-based timeouts are off;
the parent kills a worker that overruns. As a backstop (for a worker whose parent died), each request also
arms ``SIGALRM`` with its default action, which ends the process outright ``alarm`` seconds later.
"""

import json
import logging
import os
import signal
import sys


def main() -> None:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the protocol
    logging.disable(logging.CRITICAL)
    try:
        from math_verify import parse, verify
    except Exception:
        channel.write(json.dumps({"ready": False}) + "\n")
        return
    channel.write(json.dumps({"ready": True}) + "\n")
    has_alarm = hasattr(signal, "alarm")
    if has_alarm:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        req = json.loads(line)
        if has_alarm:
            signal.alarm(max(1, int(req.get("alarm", 10))))
        try:
            gold = parse("$" + req["gold"].strip().strip("$") + "$", parsing_timeout=None)
            pred = parse("$" + req["pred"].strip().strip("$") + "$", parsing_timeout=None)
            reply: dict[str, bool | str | None] = {
                "ok": bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
            }
        except BaseException as err:
            reply = {"ok": None, "error": f"{type(err).__name__}: {err}"[:500]}
        if has_alarm:
            signal.alarm(0)
        channel.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
