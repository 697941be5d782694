"""Train the bundled default model (``DigitsCNN``) on scikit-learn's digits data.

    python examples/train_digits.py

Needs scikit-learn (for the bundled ``load_digits`` data, no download) and
safetensors besides torch. Writes

* ``server/gradserve/server/models/digits_cnn.safetensors``: the weights that
  ``gradserve.server.models.digits.load_pretrained()`` loads;
* ``examples/digits_samples.npz``: 20 held-out test images per class
  (``images`` float32 [200, 1, 8, 8] in [0, 1], ``labels`` int64 [200]) for the
  example clients and the tests.

Seeds are fixed, so runs on the same torch build give the same weights. Takes a
few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from gradserve.server.models.digits import WEIGHTS, DigitsCNN

ROOT = Path(__file__).resolve().parent
SAMPLES = ROOT / "digits_samples.npz"
SEED = 0
PER_CLASS = 20


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified train/test split of the digits as (N, 1, 8, 8) float32 in [0, 1]."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=SEED, stratify=labels)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train),
            torch.from_numpy(x_test), torch.from_numpy(y_test))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float) -> DigitsCNN:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(SEED)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=shuffle)
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch:2d}  loss {total / len(x):.4f}")
    return model.eval()


def pick_samples(x: torch.Tensor, y: torch.Tensor, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` test images of each class, in class order."""
    keep = np.concatenate([np.flatnonzero(y.numpy() == c)[:per_class] for c in range(10)])
    return (np.ascontiguousarray(x.numpy()[keep], dtype=np.float32),
            np.ascontiguousarray(y.numpy()[keep], dtype=np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    x_train, y_train, x_test, y_test = load_data()
    print(f"train {len(x_train)} images, test {len(x_test)} images")
    started = time.perf_counter()
    model = train(x_train, y_train, args.epochs, args.batch_size, args.lr)
    print(f"trained in {time.perf_counter() - started:.1f} s")
    print(f"train accuracy {accuracy(model, x_train, y_train):.4f}")
    print(f"test accuracy {accuracy(model, x_test, y_test):.4f}")

    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    args.weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.weights), metadata={
        "model": "gradserve.server.models.digits.DigitsCNN",
        "data": "sklearn.datasets.load_digits, pixels / 16",
        "test_accuracy": f"{accuracy(model, x_test, y_test):.4f}"})
    args.weights.chmod(0o644)  # safetensors writes 0600; the file ships with the package
    print(f"wrote {args.weights}")

    images, labels = pick_samples(x_test, y_test, PER_CLASS)
    np.savez_compressed(args.samples, images=images, labels=labels)
    print(f"wrote {args.samples} ({len(labels)} test images, {PER_CLASS} per class); "
          f"accuracy on them {accuracy(model, torch.from_numpy(images), torch.from_numpy(labels)):.4f}")


if __name__ == "__main__":
    main()
