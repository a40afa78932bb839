"""opd_runtime: everything that runs inside opd's stage pods, and the ``opd`` command.

``opd_runtime.spec`` and ``opd_runtime.workspace`` import without torch (the operator uses them);
the training and serving modules import torch when they are used.
"""

__version__ = "0.1.0"
