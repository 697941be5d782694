"""gradserve: serve PyTorch and JAX models as differentiable functions over gRPC.

``gradserve.connect(address)`` opens a client; ``gradserve.Server`` (with the
``server`` extra installed) hosts endpoints.
"""

from __future__ import annotations

import pkgutil
from typing import Any

# The server lives in a separate source folder (server/) but the same package.
__path__ = pkgutil.extend_path(__path__, __name__)

from gradserve.client.core import Client, connect  # noqa: E402
from gradserve.errors import (  # noqa: E402
    Cancelled, DeadlineExceeded, FailedPrecondition, GradserveError, Internal, InvalidArgument,
    NotFound, PermissionDenied, RemoteError, ResidualMissing, ResourceExhausted, Unauthenticated,
    Unavailable,
)
from gradserve.security import TLSConfig  # noqa: E402
from gradserve.wire.specs import EndpointInfo, ResidualStats, TensorSpec, TensorType  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Cancelled", "Client", "DeadlineExceeded", "EndpointInfo", "FailedPrecondition",
    "GradserveError", "Internal", "InvalidArgument", "NotFound", "PermissionDenied",
    "RemoteError", "ResidualMissing", "ResidualStats", "ResourceExhausted", "Server",
    "TLSConfig", "TensorSpec", "TensorType", "Unauthenticated", "Unavailable", "connect",
]


def __getattr__(name: str) -> Any:
    if name == "Server":  # imported lazily: the server needs the `server` extra
        from gradserve.server import Server
        return Server
    raise AttributeError(f"module 'gradserve' has no attribute {name!r}")
