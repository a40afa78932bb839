"""A virtual environment holding the oldest library versions opd says it supports: pyproject's floors.

``floor_venv()`` builds it once per version set under ``$OPD_CACHE_DIR/floor-venv/<key>/`` (a lock makes
concurrent callers wait for one build) with the main venv's ``uv``: every ``name>=X`` of the ``runtime``
extra installed with uv's ``lowest-direct`` resolution, which installs exactly ``X`` unless another
requirement forces more — then the floor is not true, and ``installed_floors`` says which. The venv
doubles as a stand-in for the lent GPU machine, whose python has the same torch and transformers but no
pydantic (which opd's GPU check carries as wheels): pydantic, which transformers' own dependencies pull
in here, is removed, and opd itself is never installed (the source runs from the checkout, as there).

    python tests/support/floor_env.py     # build (or find) it and print its python

Cold, most of the time is the download of torch's CUDA libraries (the PyPI wheels pull them); uv's cache
makes a second build of the same set a copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".venv" / "bin" / "uv"
# The lent GPU machine has no pydantic: the stand-in has none either (typer, a dependency of transformers,
# pulls it in here; transformers imports typer only for its own command line).
ABSENT_ON_DEVICE = ("pydantic", "pydantic-core")
# Tests run in the venv; the lent machine has pytest too.
TEST_TOOLS = ("pytest>=8",)


def cache_dir() -> Path:
    return Path(os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd")


def floors() -> dict[str, str]:
    """``{name: version}`` of every ``name>=version`` in pyproject's ``runtime`` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for requirement in project["optional-dependencies"]["runtime"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.strip())
        if match is None:
            raise ValueError(f"pyproject.toml runtime extra: {requirement!r} is not 'name>=version'")
        out[match[1].lower()] = match[2]
    return out


def _key(requirements: list[str]) -> str:
    text = "\n".join([f"python {sys.version_info[0]}.{sys.version_info[1]}", *requirements, *ABSENT_ON_DEVICE])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def floor_venv() -> Path:
    """The venv's root (its python is ``<root>/bin/python``), built on first use."""
    requirements = [f"{name}>={version}" for name, version in floors().items()] + list(TEST_TOOLS)
    root = cache_dir() / "floor-venv" / _key(requirements)
    done = root / ".complete"
    if done.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        subprocess.run([str(UV), "venv", "--quiet", "--clear", "--python", sys._base_executable, str(root)], check=True)
        python = str(root / "bin" / "python")
        subprocess.run(
            [str(UV), "pip", "install", "--quiet", "--python", python, "--resolution", "lowest-direct", *requirements],
            check=True,
        )
        subprocess.run([str(UV), "pip", "uninstall", "--quiet", "--python", python, *ABSENT_ON_DEVICE], check=True)
        done.write_text("\n".join(requirements) + "\n")
    return root


def installed_floors(root: Path) -> dict[str, str]:
    """``{name: installed version}`` for each floor package in the venv at ``root``."""
    names = list(floors())
    code = "import importlib.metadata as m, json, sys\nprint(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    out = subprocess.run(
        [str(root / "bin" / "python"), "-c", code, *names], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


if __name__ == "__main__":
    print(floor_venv() / "bin" / "python")
