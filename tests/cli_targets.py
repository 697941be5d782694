"""Targets for `gradserve serve` in the CLI tests."""

import torch

from gradserve.server.torch_endpoint import TorchEndpoint
from gradserve import TensorSpec


def square(x):
    """Elementwise square."""
    return x * x


model = torch.nn.Linear(3, 2)
table = {"lin": model, "square": square}


def factory(device="cpu"):
    return {"sq": TorchEndpoint(square, device=device, inputs={"x": TensorSpec((None,), "float32")})}


not_servable = 42


def jax_targets():
    """A dict mixing torch and JAX endpoints (imported lazily: jax is optional)."""
    import jax
    import jax.numpy as jnp

    return {"jsin": jax.jit(jnp.sin), "tsq": square}


def fleet():
    """tests/models.py's MLP (seed 0) as "mlp": the fleet tests' replicas serve it."""
    from models import mlp

    return {"mlp": mlp()}


def cuda():
    """tests/models.py's MLP (seed 0) on the GPU as "mlp", with "double": the GPU tests'
    server in another process (torch cannot run a CUDA backward calling its own process)."""
    from models import mlp

    return {"mlp": mlp().cuda(), "double": lambda x: 2 * x}
