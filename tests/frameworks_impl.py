"""The same computations written in torch and in JAX, for the cross-framework tests.

``multi`` takes two positional tensors and a tensor keyword argument and returns
a dict holding a tuple and an integer (non-differentiable) output; ``model``
is an affine layer whose parameters a client may hold; ``wave`` is float64
elementwise math for gradient checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

rng = np.random.default_rng(0)
W = rng.standard_normal((5, 3)).astype(np.float32)
BIAS = rng.standard_normal(3).astype(np.float32)


def multi_torch(a, b, *, scale):
    h = torch.tanh(a @ torch.from_numpy(W)) * scale
    return {"out": (h.sum(-1) * b.mean(-1), h.exp()), "argmax": h.argmax(-1)}


def multi_jax(a, b, *, scale):
    h = jnp.tanh(a @ W) * scale
    return {"out": (h.sum(-1) * b.mean(-1), jnp.exp(h)), "argmax": jnp.argmax(h, -1)}


class ModelTorch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(W.T.copy()))
        self.bias = torch.nn.Parameter(torch.from_numpy(BIAS.copy()))

    def forward(self, x):
        return torch.sin(x @ self.weight.T + self.bias)


def model_jax(params, x):
    return jnp.sin(x @ params["weight"].T + params["bias"])


MODEL_PARAMS = {"weight": W.T.copy(), "bias": BIAS.copy()}


def wave_torch(x, y):
    return torch.sin(x) * y.cos() + x * y


def wave_jax(x, y):
    return jnp.sin(x) * jnp.cos(y) + x * y


def endpoints(framework: str) -> dict:
    """Endpoints named multi, model, wave, batch (batchable model) for one framework."""
    from gradserve.server.jax_endpoint import JaxEndpoint
    from gradserve.server.torch_endpoint import TorchEndpoint

    if framework == "torch":
        return {"multi": TorchEndpoint(multi_torch), "model": TorchEndpoint(ModelTorch()),
                "wave": TorchEndpoint(wave_torch),
                "batch": TorchEndpoint(ModelTorch(), batchable=True)}
    params = jax.tree_util.tree_map(jnp.asarray, MODEL_PARAMS)
    return {"multi": JaxEndpoint(jax.jit(multi_jax)),
            "model": JaxEndpoint(jax.jit(model_jax), params=params),
            "wave": JaxEndpoint(jax.jit(wave_jax)),
            "batch": JaxEndpoint(jax.jit(model_jax), params=params, batchable=True)}
