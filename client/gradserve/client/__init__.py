"""The gradserve client: remote endpoints as local differentiable functions."""

from gradserve.client.core import Call, Client, ForwardResult, Gradients, Residual, connect
from gradserve.wire.slots import SessionInfo

__all__ = ["Call", "Client", "ForwardResult", "Gradients", "Residual", "SessionInfo", "connect"]
