"""The gradserve client: remote endpoints as local differentiable functions."""

from gradserve.client.core import Call, Client, ForwardResult, Gradients, Residual, connect

__all__ = ["Call", "Client", "ForwardResult", "Gradients", "Residual", "connect"]
