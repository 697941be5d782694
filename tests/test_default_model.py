"""The bundled default model (``gradserve.server.models.digits``) and the example clients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradserve
from gradserve.server import Server
from gradserve.server.models.digits import WEIGHTS, DigitsCNN, endpoints, load_pretrained

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SAMPLES = EXAMPLES / "digits_samples.npz"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def samples() -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(SAMPLES, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    return torch.from_numpy(images), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def model() -> DigitsCNN:
    return load_pretrained()


@pytest.fixture(scope="module")
def server():
    with Server(host="127.0.0.1", port=0) as server:
        for name, endpoint in endpoints().items():
            server.add(name, endpoint)
        yield server


@pytest.fixture(scope="module")
def client(server):
    with gradserve.connect(server.address, timeout=30) as client:
        yield client


def test_shipped_files(samples):
    images, labels = samples
    assert WEIGHTS.is_file()
    assert images.dtype == torch.float32 and tuple(images.shape) == (200, 1, 8, 8)
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (200,)
    assert 0.0 <= images.min().item() and images.max().item() <= 1.0
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10


def test_pretrained_accuracy(model, samples):
    images, labels = samples
    assert not model.training
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9


def test_endpoint_description(client):
    info = client.describe("digits")
    assert info.framework == "torch"
    assert "8x8" in info.doc
    assert info.inputs == {"x": gradserve.TensorSpec((None, 1, 8, 8), "float32")}
    assert info.outputs == {"logits": gradserve.TensorSpec((None, 10), "float32")}
    assert "digits" in [e.name for e in client.endpoints()]


def test_remote_logits_match_local(client, model, samples):
    images, _ = samples
    remote = client.torch("digits")(images)
    with torch.no_grad():
        local = model(images)
    torch.testing.assert_close(remote, local, **TOL)


def test_remote_saliency_matches_local(client, model, samples):
    images, _ = samples
    x_remote = images[::7].clone().requires_grad_(True)
    logits = client.torch("digits")(x_remote)
    predicted = logits.argmax(1, keepdim=True)
    logits.gather(1, predicted).sum().backward()

    x_local = images[::7].clone().requires_grad_(True)
    local = model(x_local)
    local.gather(1, local.argmax(1, keepdim=True)).sum().backward()

    assert x_remote.grad is not None and x_remote.grad.abs().sum() > 0
    torch.testing.assert_close(x_remote.grad, x_local.grad, **TOL)


def test_wrong_input_shape_is_rejected(client):
    with pytest.raises(gradserve.InvalidArgument, match="shape"):
        client.torch("digits")(torch.zeros(2, 1, 28, 28))


def _run_example(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_saliency_example(server):
    out = _run_example("saliency.py", "--address", server.address, "--index", "13")
    assert "true label 0, predicted 0" in out.splitlines()[0]
    assert "correct: True" in out.splitlines()
    pictures = [line for line in out.splitlines() if line.startswith("|")]
    assert len(pictures) == 8 and all(len(line) == 38 for line in pictures)


def test_flip_prediction_example(server):
    out = _run_example("flip_prediction.py", "--address", server.address, "--index", "45")
    lines = out.splitlines()
    assert "sample 45: true label 2, predicted 2, target 3" in lines
    assert "final prediction: 3 (started as 2, target 3)" in lines
    assert "flipped: True" in lines
    assert any(line.startswith("step   0  loss ") for line in lines)


def test_jax_gradient_matches_local_torch(client, model, samples):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    images, labels = samples
    x, targets = images[::7], (labels[::7] + 1) % 10
    f = client.jax("digits")

    def target_logits(x):
        return jnp.take_along_axis(f(x), jnp.asarray(targets.numpy())[:, None], axis=1).sum()

    grad = jax.grad(target_logits)(jnp.asarray(x.numpy()))
    jitted = jax.jit(jax.grad(target_logits))(jnp.asarray(x.numpy()))

    x_local = x.clone().requires_grad_(True)
    model(x_local).gather(1, targets[:, None]).sum().backward()

    assert grad.shape == tuple(x.shape) and grad.dtype == jnp.float32
    assert x_local.grad.abs().sum() > 0
    np.testing.assert_allclose(np.asarray(grad), x_local.grad.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(jitted), x_local.grad.numpy(), **TOL)


def _run_without_torch(script: str, *args: str) -> str:
    """Run an example in a process where ``import torch`` fails."""
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = {[script, *args]!r}; "
            f"runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_jax_flip_prediction_example_without_torch(server):
    pytest.importorskip("jax")
    out = _run_without_torch("jax_flip_prediction.py", "--address", server.address,
                             "--index", "45")
    lines = out.splitlines()
    assert "sample 45: true label 2, predicted 2, target 3" in lines
    assert "final prediction: 3 (started as 2, target 3)" in lines
    assert "flipped: True" in lines
    assert any(line.startswith("step   0  loss ") for line in lines)
    losses = [float(line.split()[3]) for line in lines if line.startswith("step ")]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_jax_flip_prediction_example_explicit_target(server):
    pytest.importorskip("jax")
    out = _run_without_torch("jax_flip_prediction.py", "--address", server.address,
                             "--index", "0", "--target", "8", "--every", "20")
    lines = out.splitlines()
    assert "sample 0: true label 0, predicted 0, target 8" in lines
    assert "final prediction: 8 (started as 0, target 8)" in lines
    assert "flipped: True" in lines
