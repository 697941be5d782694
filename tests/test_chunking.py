"""Tensors of any size travel the bytes path in bounded chunks."""

from __future__ import annotations

import torch


def scale_and_sum(x, w):
    return x * w, (x * w).sum(dim=0)


def test_64_mib_tensor_forward_and_backward(serve) -> None:
    _, client = serve({"scale": scale_and_sum}, client_options={"transport": "grpc"})
    x = torch.randn(16 << 20, requires_grad=True)       # 64 MiB of float32
    w = torch.tensor(3.0, requires_grad=True)
    y, s = client.torch("scale")(x, w)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x.detach() * 3.0, rtol=0, atol=0)
    ct = torch.ones_like(y)
    (y * ct).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0), rtol=0, atol=0)
    torch.testing.assert_close(w.grad, x.detach().sum(), rtol=1e-4, atol=1e-2)


def test_tensor_far_beyond_the_message_limit(serve) -> None:
    """The >2 GiB case, scaled down: every gRPC message is capped at 64 KiB and the
    tensors are 64x that, so the only way through is chunking in both directions."""
    limit = 64 << 10
    _, client = serve({"scale": scale_and_sum}, max_message_bytes=limit, chunk_bytes=16 << 10,
                      client_options={"chunk_bytes": 16 << 10, "transport": "grpc"})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 20, generator=g, dtype=torch.float32, requires_grad=True)  # 4 MiB
    w = torch.tensor(-0.5, requires_grad=True)
    ct = torch.randn(1 << 20, generator=g)
    y, _ = client.torch("scale")(x, w)
    torch.testing.assert_close(y, x.detach() * -0.5, rtol=0, atol=0)
    y.backward(ct)
    torch.testing.assert_close(x.grad, ct * -0.5, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, (ct * x.detach()).sum(), rtol=1e-4, atol=1e-3)
