"""The bundled default model: a small CNN that classifies 8x8 handwritten digits.

It was trained on scikit-learn's digits data (``sklearn.datasets.load_digits``)
by ``examples/train_digits.py``; the weights ship next to this module as
``digits_cnn.safetensors``. ``endpoints()`` is what ``gradserve serve
gradserve.server.models.digits:endpoints`` hosts: one endpoint, ``digits``,
mapping images ``float32[N, 1, 8, 8]`` (pixels in [0, 1]) to class logits
``float32[N, 10]``. Loading needs torch and safetensors only (no scikit-learn).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradserve.server.torch_endpoint import TorchEndpoint
from gradserve.wire.specs import TensorSpec

WEIGHTS = Path(__file__).resolve().parent / "digits_cnn.safetensors"
"""The committed weights file, written by ``examples/train_digits.py``."""

DOC = ("Classify 8x8 handwritten digits: x float32[N, 1, 8, 8] with pixels in [0, 1] "
       "-> logits float32[N, 10] (a small CNN trained on scikit-learn's digits).")


class DigitsCNN(nn.Module):
    """Classify 8x8 handwritten digits (pixels in [0, 1]) into logits over the classes 0-9.

    Two 3x3 convolutions (1->16->32 channels, ReLU), a 2x2 max-pool, then a
    64-unit hidden layer. ``forward(x)`` takes ``x`` of shape (N, 1, 8, 8)
    and returns unnormalised logits of shape (N, 10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) for images ``x`` of shape (N, 1, 8, 8) with pixels in [0, 1]."""
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.pool(x)
        x = torch.relu(self.fc1(x.flatten(1)))
        logits: torch.Tensor = self.fc2(x)
        return logits


def load_pretrained() -> DigitsCNN:
    """A ``DigitsCNN`` with the bundled trained weights, in eval mode."""
    from safetensors.torch import load_file

    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"bundled weights {WEIGHTS} are missing; "
                                "run examples/train_digits.py to create them")
    model = DigitsCNN()
    model.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    return model.eval()


def endpoints(device: str | torch.device | None = None) -> dict[str, TorchEndpoint]:
    """The default model's endpoints by name: ``{"digits": ...}``.

    ``device`` (default CPU) is where the model runs; ``gradserve serve
    --device`` passes it through. The CNN maps over its batch axis (eval mode), so it is
    ``batchable``: concurrent callers' images are merged into one run.
    """
    return {
        "digits": TorchEndpoint(
            load_pretrained(), device=device,
            inputs={"x": TensorSpec((None, 1, 8, 8), "float32")},
            outputs={"logits": TensorSpec((None, 10), "float32")},
            doc=DOC, batchable=True),
    }
