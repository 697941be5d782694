"""Models placed on a GPU, reached by clients that send CPU tensors (bytes or shared
memory), by JAX clients, and as several instances (``gpu``-marked: they run only where
torch sees a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradserve
from gradserve.server import JaxEndpoint, Server
from models import local_input_grad, mlp

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_cpu_tensors_reach_a_gpu_model_and_come_back_on_the_cpu(serve, transport) -> None:
    model = mlp().cuda()
    _, client = serve({"mlp": model}, client_options={"transport": transport})
    assert client.describe("mlp").devices == ("cuda:0",)     # served where its weights are
    x = torch.randn(512, 6, requires_grad=True)
    ct = torch.randn(512, 4)
    y = client.torch("mlp")(x)
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, model(x.cuda()).cpu(), rtol=1e-5, atol=1e-5)
    y.backward(ct)
    local = local_input_grad(model, x.detach().cuda().requires_grad_(True), ct.cuda()).cpu()
    torch.testing.assert_close(x.grad, local, rtol=1e-5, atol=1e-5)


def test_instances_on_the_gpu_and_the_cpu_agree() -> None:
    model = mlp()
    server = Server("127.0.0.1", 0)
    server.add_torch("mlp", model, devices=["cuda:0", "cpu"])
    server.start()
    try:
        with gradserve.connect(server.address, transport="grpc") as client:
            assert client.describe("mlp").devices == ("cuda:0", "cpu")
            x = torch.randn(64, 6, requires_grad=True)
            ct = torch.randn(64, 4)
            f = client.torch("mlp")
            for _ in range(4):                   # least loaded: both instances get calls
                x.grad = None
                f(x).backward(ct)
                torch.testing.assert_close(x.grad, local_input_grad(model, x, ct),
                                           rtol=1e-5, atol=1e-5)
            instances = client.describe("mlp").instances
            assert sum(i.forward_calls for i in instances) == 4
            assert [i.vjp_calls for i in instances] == [i.forward_calls for i in instances]
    finally:
        server.stop(grace=0)


def test_a_jax_endpoint_on_the_gpu() -> None:
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "gpu":
        pytest.skip("jax has no GPU backend here")
    jnp = jax.numpy
    w = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    server = Server("127.0.0.1", 0)
    server.add("f", JaxEndpoint(lambda p, x: jnp.tanh(jnp.matmul(x, p, precision="highest")),
                                params=jnp.asarray(w),
                                device="cuda:0"))
    server.start()
    try:
        with gradserve.connect(server.address) as client:
            x = torch.randn(16, 6, dtype=torch.float32, requires_grad=True)
            client.torch("f")(x).sum().backward()
            xl = x.detach().clone().requires_grad_(True)
            torch.tanh(xl @ torch.from_numpy(w)).sum().backward()
            torch.testing.assert_close(x.grad, xl.grad, rtol=1e-5, atol=1e-5)
    finally:
        server.stop(grace=0)
