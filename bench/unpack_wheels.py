"""``python bench/unpack_wheels.py WHEELS TARGET``: install the wheels of folder WHEELS that fit this python
into TARGET (a folder to put on PYTHONPATH), without pip. A wheel is a zip of its installed files, so
unpacking installs it; of each package the wheel built for this interpreter (cpXY, this machine's
architecture) or for any (py3-none-any) is taken. Standard library only: it runs before anything else is
importable (bench/gpu_check.sh on a GPU machine, tests/training/test_floor_versions.py)."""

from __future__ import annotations

import platform
import sys
import zipfile
from pathlib import Path


def fitting(wheels: list[Path]) -> list[Path]:
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    out = []
    for wheel in wheels:
        python_tag = wheel.name.split("-")[-3]
        if python_tag in ("py3", tag) and (wheel.name.endswith("-any.whl") or platform.machine() in wheel.name):
            out.append(wheel)
    return out


def main(argv: list[str]) -> int:
    source, target = Path(argv[0]), Path(argv[1])
    wheels = sorted(source.glob("*.whl"))
    chosen = fitting(wheels)
    names = {w.name.split("-")[0] for w in wheels}
    missing = names - {w.name.split("-")[0] for w in chosen}
    if missing:
        print(f"unpack_wheels: no wheel of {sorted(missing)} in {source} fits this python", file=sys.stderr)
        return 2
    for wheel in chosen:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
