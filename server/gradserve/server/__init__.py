"""The gradserve server: host models and functions as differentiable endpoints."""

from gradserve.server.host import Server
from gradserve.server.registry import Endpoint
from gradserve.specs import TensorSpec

__all__ = ["Endpoint", "Server", "TensorSpec", "TorchEndpoint"]


def __getattr__(name: str):
    if name == "TorchEndpoint":  # imported lazily: needs torch
        from gradserve.server.torch_endpoint import TorchEndpoint
        return TorchEndpoint
    raise AttributeError(f"module 'gradserve.server' has no attribute {name!r}")
