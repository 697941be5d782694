"""Saliency map through a remote model: which pixels move the predicted logit?

Start a server with the default model (``make serve``, or
``gradserve serve gradserve.server.models.digits:endpoints``), then

    python examples/saliency.py [--address 127.0.0.1:50051] [--index 0]

The client wraps the ``digits`` endpoint as a torch function, runs one shipped
test image through it, and calls ``backward()`` on the predicted class's logit:
the gradient w.r.t. the input pixels comes back from the server as a Vjp. It
prints the digit and ``|gradient|`` as 8x8 ASCII pictures. Needs only numpy,
torch and the gradserve client (no model code, no weights on this side).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import gradserve

SAMPLES = Path(__file__).resolve().parent / "digits_samples.npz"
RAMP = " .:-=+*#%@"  # light to dark


def load_samples(path: Path = SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """The shipped test images (float32 [N, 1, 8, 8] in [0, 1]) and labels (int64 [N])."""
    with np.load(path, allow_pickle=False) as data:
        return data["images"], data["labels"]


def ascii_image(values: np.ndarray, scale: float) -> list[str]:
    """An 8x8 array as rows of characters, 0 -> blank and ``scale`` -> darkest."""
    levels = np.clip(values / scale if scale > 0 else values * 0, 0.0, 1.0)
    index = np.minimum((levels * len(RAMP)).astype(int), len(RAMP) - 1)
    return ["".join(RAMP[i] * 2 for i in row) for row in index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--endpoint", default="digits")
    parser.add_argument("--index", type=int, default=0, help="which shipped sample (0-199)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    args = parser.parse_args(argv)

    images, labels = load_samples()
    if not 0 <= args.index < len(labels):
        parser.error(f"--index must be in [0, {len(labels)})")
    x = torch.from_numpy(images[args.index:args.index + 1].copy()).requires_grad_(True)
    label = int(labels[args.index])

    try:
        with gradserve.connect(args.address, timeout=args.timeout) as client:
            f = client.torch(args.endpoint)
            logits = f(x)                          # Forward RPC; logits carry autograd
            predicted = int(logits.argmax(1).item())
            logits[0, predicted].backward()        # Vjp RPC fills x.grad
    except gradserve.GradserveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    probabilities = torch.softmax(logits.detach()[0], 0)
    saliency = x.grad[0, 0].abs().numpy()
    print(f"sample {args.index}: true label {label}, predicted {predicted} "
          f"(p={probabilities[predicted].item():.3f})")
    print(f"correct: {predicted == label}")
    print(f"max |d logit[{predicted}] / d pixel| = {saliency.max():.4f}")
    print()
    print(f"{'digit':<18}  {'|gradient|':<16}")
    for digit_row, grad_row in zip(ascii_image(x.detach()[0, 0].numpy(), 1.0),
                                   ascii_image(saliency, float(saliency.max()))):
        print(f"|{digit_row}|  |{grad_row}|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
