"""The DistillationRun spec (group opd.dev, version v1alpha1). Imports without torch.

The field descriptions here are the single source of documentation: the docs' reference page
(docs/reference/distillationrun.md, ``opd spec-reference``) and the CRD's OpenAPI schema are generated from them.
"""

from ..contract import API_VERSION, GROUP, KIND, VERSION
from .models import (
    DatasetSpec,
    LoraSpec,
    ModelCacheSpec,
    ModelSpec,
    OptimizerSpec,
    ProblemSetSpec,
    ResourcesSpec,
    TeacherServingSpec,
    TeacherSpec,
)
from .run import DistillationRun, DistillationRunSpec, SpecError, WorkspaceSpec, load_run, parse_run
from .stages import CheckpointingSpec, DistillSpec, EvalDatasetSpec, EvalSpec, SamplerSpec, SftSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "VERSION",
    "CheckpointingSpec",
    "DatasetSpec",
    "DistillSpec",
    "DistillationRun",
    "DistillationRunSpec",
    "EvalDatasetSpec",
    "EvalSpec",
    "LoraSpec",
    "ModelCacheSpec",
    "ModelSpec",
    "OptimizerSpec",
    "ProblemSetSpec",
    "ResourcesSpec",
    "SamplerSpec",
    "SftSpec",
    "SpecError",
    "TeacherServingSpec",
    "TeacherSpec",
    "WorkspaceSpec",
    "load_run",
    "parse_run",
]
