"""The gradserve server: host models and functions as differentiable endpoints."""

from gradserve.server.host import Server
from gradserve.server.registry import Endpoint
from gradserve.specs import TensorSpec

__all__ = ["Endpoint", "JaxEndpoint", "Server", "TensorSpec", "TorchEndpoint"]


def __getattr__(name: str):
    # imported lazily: each needs its framework
    if name == "TorchEndpoint":
        from gradserve.server.torch_endpoint import TorchEndpoint
        return TorchEndpoint
    if name == "JaxEndpoint":
        from gradserve.server.jax_endpoint import JaxEndpoint
        return JaxEndpoint
    raise AttributeError(f"module 'gradserve.server' has no attribute {name!r}")
