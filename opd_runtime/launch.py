"""``python -m opd_runtime.launch [torchrun options] opd sft|distill ...``: torchrun keeping opd's exit codes.

torchrun itself exits 1 whenever a worker fails, which would turn a stage's "bad configuration, do not
retry" (exit 2) into "transient failure, retry" (exit 1). This runs torchrun's own entry point with the
same arguments and, when workers fail, exits 2 if any of them exited 2 and 1 otherwise.
``plan.launcher_argv`` builds the prefix for stage pods.
"""

from __future__ import annotations

import sys

from .contract import EXIT_BAD_CONFIG, EXIT_RETRY


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        print(f"opd launch: workers failed with exit codes {sorted(codes)}", file=sys.stderr)
        return EXIT_BAD_CONFIG if EXIT_BAD_CONFIG in codes else EXIT_RETRY
    return 0


if __name__ == "__main__":
    sys.exit(main())
