"""Adversarial nudge through a remote model: change a digit until the model misreads it.

Start a server with the default model (``make serve``), then

    python examples/flip_prediction.py [--address 127.0.0.1:50051] [--index 0] [--target B]

Starting from a shipped test image of class A, it optimises the pixels with
``torch.optim.Adam`` so the remote ``digits`` endpoint predicts class B
(default ``(A + 1) % 10``): cross-entropy towards B plus a small L2 penalty
that keeps the image close to the original, pixels clipped to [0, 1]. Every
step is a Forward and a Vjp against the server. It stops as soon as the
prediction flips (or after ``--steps``) and prints the distance moved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradserve

SAMPLES = Path(__file__).resolve().parent / "digits_samples.npz"


def load_samples(path: Path = SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """The shipped test images (float32 [N, 1, 8, 8] in [0, 1]) and labels (int64 [N])."""
    with np.load(path, allow_pickle=False) as data:
        return data["images"], data["labels"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--endpoint", default="digits")
    parser.add_argument("--index", type=int, default=0, help="which shipped sample (0-199)")
    parser.add_argument("--target", type=int, default=None,
                        help="class to reach (default: the true label + 1, mod 10)")
    parser.add_argument("--steps", type=int, default=300, help="give up after this many steps")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam step size")
    parser.add_argument("--l2", type=float, default=0.01, help="weight of ||x - x0||^2")
    parser.add_argument("--every", type=int, default=5, help="print progress every N steps")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    args = parser.parse_args(argv)

    images, labels = load_samples()
    if not 0 <= args.index < len(labels):
        parser.error(f"--index must be in [0, {len(labels)})")
    label = int(labels[args.index])
    target = (label + 1) % 10 if args.target is None else args.target
    if not 0 <= target < 10 or target == label:
        parser.error(f"--target must be a class 0-9 other than the sample's label {label}")

    x0 = torch.from_numpy(images[args.index:args.index + 1].copy())
    x = x0.clone().requires_grad_(True)
    goal = torch.tensor([target])
    optimizer = torch.optim.Adam([x], lr=args.lr)

    try:
        with gradserve.connect(args.address, timeout=args.timeout) as client:
            f = client.torch(args.endpoint)
            with torch.no_grad():
                start = int(f(x0).argmax(1).item())
            print(f"sample {args.index}: true label {label}, predicted {start}, target {target}")
            flipped, step = False, 0
            for step in range(args.steps + 1):
                optimizer.zero_grad()
                logits = f(x)                         # Forward RPC
                predicted = int(logits.argmax(1).item())
                if predicted == target:               # x as it stands is misread: done
                    flipped = True
                    break
                if step == args.steps:
                    break
                ce = F.cross_entropy(logits, goal)
                loss = ce + args.l2 * (x - x0).pow(2).sum()
                if step % args.every == 0:
                    print(f"step {step:3d}  loss {loss.item():.4f}  (cross-entropy {ce.item():.4f})  "
                          f"predicted {predicted}")
                loss.backward()                       # Vjp RPC fills x.grad
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
            with torch.no_grad():                     # check the final image independently
                final = int(f(x.detach()).argmax(1).item())
    except gradserve.GradserveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    distance = (x.detach() - x0).norm().item()
    print(f"stopped after {step} steps")
    print(f"final prediction: {final} (started as {start}, target {target})")
    print(f"L2 distance moved: {distance:.4f} (the image's own norm is {x0.norm().item():.4f})")
    print(f"flipped: {flipped and final == target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
