"""The GPUs the memory plan knows by name, and Kubernetes quantities read as bytes.

Capacities are the totals ``nvidia-smi`` reports for each card (MiB), not the marketing figure: an "80 GB"
H100 shows 81,559 MiB. A card that is not here is given by its memory (``resources.gpuMemory``).
"""

from __future__ import annotations

import re

MIB = 1024**2
GIB = 1024**3

# name -> total memory in MiB, as nvidia-smi reports it
GPU_MEMORY_MIB: dict[str, int] = {
    "H100": 81_559,
    "H200": 143_771,
    "A100-40GB": 40_960,
    "A100-80GB": 81_920,
    "L40S": 46_068,
}
# The GPU a stage that names none is planned for: an 80 GB H100.
DEFAULT_GPU = "H100"

_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")


def quantity_bytes(text: str) -> int:
    """A Kubernetes quantity of bytes (``80Gi``, ``48G``, ``81559Mi``) as an integer."""
    m = _QUANTITY.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a quantity such as 80Gi or 48G")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


_ALIASES = {"H100-80GB": "H100", "H200-141GB": "H200", "L40S-48GB": "L40S"}


def known_gpu(name: str) -> str | None:
    """The table's spelling of ``name`` (any case; ``H100-80GB`` style aliases too), or None."""
    wanted = name.strip().upper()
    for known in GPU_MEMORY_MIB:
        if wanted == known.upper():
            return known
    return _ALIASES.get(wanted)
