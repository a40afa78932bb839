"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok as local processes (``cluster.py``), from binaries built once and cached by version
(``binaries.py``); the pytest plugin ``controlplane.fixtures`` provides the session fixture ``control_plane``.
"""

from .cluster import (
    EXIT_CODE_ANNOTATION,
    HELD_IMAGE,
    NODE_NAME,
    STORAGE_CLASS,
    TERMINATION_MESSAGE_ANNOTATION,
    ApiError,
    ControlPlane,
    ControlPlaneError,
    container,
    restricted_security_context,
    start,
)

__all__ = [
    "EXIT_CODE_ANNOTATION",
    "HELD_IMAGE",
    "NODE_NAME",
    "STORAGE_CLASS",
    "TERMINATION_MESSAGE_ANNOTATION",
    "ApiError",
    "ControlPlane",
    "ControlPlaneError",
    "container",
    "restricted_security_context",
    "start",
]
