"""Small torch models and functions the tests serve and compare against."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class MultiIO(nn.Module):
    """Several inputs (one a tensor keyword argument), dict + tuple + int outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.proj = nn.Linear(5, 5)

    def forward(self, a, b, *, scale, mask=None, mode="sum"):
        h = self.proj(a) * scale + b.sin()
        if mask is not None:
            h = h * mask
        out = h.sum(-1) if mode == "sum" else h.mean(-1)
        return {"out": out, "pair": (h.exp(), a * b), "argmax": h.argmax(-1), "mode": mode}


def pytree_fn(inputs, weights):
    """Takes nested inputs: a dict with a list of tensors."""
    x, y = inputs["xs"]
    return [x @ weights["w"], (y * weights["w"].sum()).cos()]


def local_input_grad(model, x: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
    """d(model(x)) . ct with respect to x, computed locally."""
    x = x.detach().clone().requires_grad_()
    model(x).backward(ct)
    return x.grad
