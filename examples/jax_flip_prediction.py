"""Adversarial nudge through a remote PyTorch model, driven from JAX.

The JAX twin of ``flip_prediction.py``: start a server with the default model
(``make serve``), then

    python examples/jax_flip_prediction.py [--address 127.0.0.1:50051] [--index 0] [--target B]

The client side is pure JAX (torch need not be installed here): the remote
``digits`` endpoint becomes a differentiable JAX function with
``client.jax("digits")``, and ``jax.jit(jax.value_and_grad(loss))`` runs it
like any other function. Starting from a shipped test image of class A, a
hand-written Adam (a few lines of ``jax.numpy``) optimises the pixels so the
model predicts class B (default ``(A + 1) % 10``): cross-entropy towards B
plus a small L2 penalty that keeps the image close to the original, pixels
clipped to [0, 1]. Every step is a Forward and a Vjp against the server. It
stops as soon as the prediction flips (or after ``--steps``) and prints the
distance moved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gradserve

SAMPLES = Path(__file__).resolve().parent / "digits_samples.npz"


def load_samples(path: Path = SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """The shipped test images (float32 [N, 1, 8, 8] in [0, 1]) and labels (int64 [N])."""
    with np.load(path, allow_pickle=False) as data:
        return data["images"], data["labels"]


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Plain Adam (as ``torch.optim.Adam``): ``init(x) -> state``, ``update(x, g, state)``."""

    def init(x: jax.Array) -> tuple:
        return jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros((), jnp.int32)

    def update(x: jax.Array, g: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        m, v, t = state
        t = t + 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        x = x - lr * m_hat / (jnp.sqrt(v_hat) + eps)
        return jnp.clip(x, 0.0, 1.0), (m, v, t)      # stay a valid image

    return init, update


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

    x0 = jnp.asarray(images[args.index:args.index + 1])
    init, update = adam(args.lr)

    try:
        with gradserve.connect(args.address, timeout=args.timeout) as client:
            f = client.jax(args.endpoint)             # x [N,1,8,8] -> logits [N,10]

            def loss_fn(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
                logits = f(x)                         # Forward RPC (Vjp RPC when differentiated)
                ce = -jax.nn.log_softmax(logits)[:, target].mean()
                return ce + args.l2 * jnp.sum((x - x0) ** 2), (ce, logits)

            grad_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
            update = jax.jit(update)

            start = int(jnp.argmax(f(x0), axis=1)[0])
            print(f"sample {args.index}: true label {label}, predicted {start}, target {target}")
            x, state = x0, init(x0)
            flipped, step = False, 0
            for step in range(args.steps + 1):
                (loss, (ce, logits)), g = grad_step(x)
                predicted = int(jnp.argmax(logits, axis=1)[0])
                if predicted == target:               # x as it stands is misread: done
                    flipped = True
                    break
                if step == args.steps:
                    break
                if step % args.every == 0:
                    print(f"step {step:3d}  loss {float(loss):.4f}  "
                          f"(cross-entropy {float(ce):.4f})  predicted {predicted}")
                x, state = update(x, g, state)
            final = int(jnp.argmax(f(x), axis=1)[0])  # check the final image independently
    except gradserve.GradserveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    distance, norm = float(jnp.linalg.norm(x - x0)), float(jnp.linalg.norm(x0))
    print(f"stopped after {step} steps")
    print(f"final prediction: {final} (started as {start}, target {target})")
    print(f"L2 distance moved: {distance:.4f} (the image's own norm is {norm:.4f})")
    print(f"flipped: {flipped and final == target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
