"""The gradserve server: host models and functions as differentiable endpoints."""

from __future__ import annotations

from typing import Any

from gradserve.frameworks import FRAMEWORKS
from gradserve.server.endpoint import Endpoint, endpoint_module
from gradserve.server.host import Server
from gradserve.wire.specs import TensorSpec, TensorType

__all__ = ["Endpoint", "JaxEndpoint", "Server", "TensorSpec", "TensorType", "TorchEndpoint"]


def __getattr__(name: str) -> Any:
    # each framework's Endpoint subclass, imported on use: each needs its framework
    for fw in FRAMEWORKS:
        if fw.endpoint and name == f"{fw.name.capitalize()}Endpoint":
            return getattr(endpoint_module(fw.name), name)
    raise AttributeError(f"module 'gradserve.server' has no attribute {name!r}")
