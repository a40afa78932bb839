"""opd_operator: the kopf operator that reconciles DistillationRun resources.

It imports the spec models from ``opd_runtime.spec`` (no torch) so the operator image stays slim.
"""

__version__ = "0.1.0"
