"""The contract between a stage process and whoever starts it (the operator, ``opd run``), stated once.

Stage names, exit codes, the custom resource's API coordinates and the environment every stage process
gets. Both sides import these; this module imports nothing, so the operator (no torch), the spec models
and the stage code all can. See CONTRIBUTING.md for the layers.
"""

from __future__ import annotations

from typing import Final

# ---- the DistillationRun resource -------------------------------------------------------------------
GROUP: Final = "opd.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "opd.dev/v1alpha1"  # GROUP/VERSION, spelled out: type checkers then see the literal
KIND: Final = "DistillationRun"
PLURAL: Final = "distillationruns"
# The controller name of an operator started without --controller-name: it acts on runs whose
# spec.managedBy is unset or this name, and an operator with another name acts only on runs naming it.
DEFAULT_CONTROLLER: Final = "opd.dev/operator"
# A controller name: a domain-prefixed path, as Job's spec.managedBy.
CONTROLLER_NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-A-Za-z0-9_.]+$"
# A run's name, checked alike by the spec (`opd validate`, `opd run`) and the CRD (the API server). Child
# objects are named <run>-<suffix>: the longest, a stage Job `<run>-distill-<attempt>`, adds up to 12
# characters, and the Job controller adds 6 more (`-xxxxx`) to each pod's name, whose Job name is also a
# label value (at most 63 characters): 45 + 12 + 6 = 63. It must start with a letter because
# `<run>-teacher` names a Service (an RFC 1035 label).
MAX_RUN_NAME_LENGTH: Final = 45
RUN_NAME_PATTERN: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# ---- stages -------------------------------------------------------------------------------------------
# Every stage a run can have, in execution order. ``teacher`` is the vLLM server the OPD learner scores
# against; it runs beside ``distill`` (a Deployment on Kubernetes, a background process locally).
STAGES = ("sft", "teacher", "distill", "eval")
# The stages a spec enables, which run to completion (a Job on Kubernetes) and report a result.
BATCH_STAGES = ("sft", "distill", "eval")
# The stages that train: they count steps, checkpoint, and may run as several data-parallel processes
# under torchrun (training/distributed.py).
TRAINING_STAGES = ("sft", "distill")

# ---- exit codes: what the starter should do next --------------------------------------------------------
EXIT_OK = 0
EXIT_RETRY = 1  # transient failure: the stage may be started again (it resumes from its last checkpoint)
EXIT_BAD_CONFIG = 2  # do not retry until the spec changes: the message says what to fix
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM; the workspace keeps the last checkpoint

# ---- environment --------------------------------------------------------------------------------------
# vLLM reports anonymous usage statistics unless told not to; stage pods, the served teacher, local runs
# and the tests all turn it off.
NO_USAGE_STATS_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# The teacher server's API key (spec.teacher.serving.apiKeySecret): the operator puts it, from the Secret,
# into the teacher pods (serve-teacher hands it to vLLM as VLLM_API_KEY) and the learner pods (the HTTP
# teacher client sends it as `Authorization: Bearer`). Unset: no key.
TEACHER_API_KEY_ENV = "OPD_TEACHER_API_KEY"
