"""The gradserve client: remote endpoints as local differentiable functions."""

from gradserve.client.calls import Call, Residual
from gradserve.client.core import Client, ForwardResult, Gradients, connect
from gradserve.client.replica import ReplicaInfo
from gradserve.wire.slots import SessionInfo

__all__ = ["Call", "Client", "ForwardResult", "Gradients", "ReplicaInfo", "Residual",
           "SessionInfo", "connect"]
