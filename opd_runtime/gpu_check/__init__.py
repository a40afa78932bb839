"""The GPU check (``opd gpu-check``, ``bench/gpu_check.sh``): opd's training path proven on one machine.

Three parts, each reported as passed, FAILED or NOT CHECKED, with an exit code that never hides a part
that was asked for and could not run:

- ``numerics``: the run's precision on the device against a float32 reference on the CPU (the packed SFT
  loss and the OPD importance-sampling loss: loss and gradient cosine), packed against unpacked rows, and
  the collectives on a process group of the processes started (NCCL on GPUs, gloo on CPUs): the
  data-parallel gradient all-reduce, FSDP2 under the bf16 policy, a DCP save and load, and a resume that
  puts the optimizer state on the parameters' device (``numerics``);
- ``size``: a random-init Qwen3-1.7B trained at real lengths, full and LoRA: peak memory, tokens/s and
  MFU per case (``size``);
- ``vllm``: the OPD sampler's vLLM engine beside the trainer: sleep, wake, weight reload with the probe,
  behaviour log-probs against the trainer's (``engine``).

``--tiny`` runs all of it on small shapes, on a CPU in seconds; that is what the tests run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

PASSED, FAILED, NOT_CHECKED = "passed", "FAILED", "NOT CHECKED"


@dataclass
class Check:
    """One line of the verdict: a named check, its status and what was measured."""

    part: str
    name: str
    status: str
    detail: str = ""
    numbers: dict = field(default_factory=dict)
    traceback: str = ""  # a FAILED check's exception in full, for a run that can be read only afterwards


def failed(part: str, name: str, err: BaseException) -> Check:
    """The check ``name`` FAILED by ``err``, printed in full (stderr) and kept in full (the JSON)."""
    import traceback

    trace = "".join(traceback.format_exception(err))
    print(trace, end="", file=sys.stderr)
    return Check(part, name, FAILED, f"{type(err).__name__}: {err}", traceback=trace)
