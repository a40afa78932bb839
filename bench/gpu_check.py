"""The GPU check as a script: ``python bench/gpu_check.py --tiny`` is ``python -m opd_runtime.gpu_check
--tiny`` (see ``opd_runtime/gpu_check``). ``bench/gpu_check.sh`` is the entry for a GPU machine: it
finds the python, the carried wheels and the source, and starts one process per GPU."""

from __future__ import annotations

import sys

from opd_runtime.gpu_check.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
