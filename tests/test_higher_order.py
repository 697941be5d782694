"""Higher-order reverse mode through a remote torch endpoint: a Vjp under
``create_graph=True`` keeps its graph on the server, and its gradients are differentiated
by a Vjp of that Vjp, to any order, recomputing every level a server lost."""

from __future__ import annotations

import gc
import threading

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.server import Server
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import codec
from gradserve.wire.framing import FrameWriter
from helpers import raw
from models import mlp

TOL = dict(rtol=1e-10, atol=1e-10)


def cube(x):
    return (x ** 3).sum()


def local_and_remote(serve, fn):
    _, client = serve({"f": fn})
    return client, client.torch("f")


def test_hessian_and_hessian_vector_products_equal_local(serve) -> None:
    model = mlp(dtype=torch.float64)
    client, f = local_and_remote(serve, model)

    def energy(g):
        return lambda x: torch.tanh(g(x)).pow(2).sum()

    x = torch.randn(3, 6, dtype=torch.float64)
    v = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.functional.hessian(energy(f), x),
                               torch.autograd.functional.hessian(energy(model), x), **TOL)
    _, hvp = torch.autograd.functional.hvp(energy(f), x, v)
    _, want = torch.autograd.functional.hvp(energy(model), x, v)
    torch.testing.assert_close(hvp, want, **TOL)
    assert client.describe("f").reverse_order == 0          # any order
    assert client.recomputes == 0


def test_third_order_and_gradients_with_respect_to_the_cotangents(serve) -> None:
    _, f = local_and_remote(serve, lambda x: x ** 3)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(x), x, grad_outputs=v, create_graph=True)   # 3 x^2 v
    torch.testing.assert_close(g, 3 * x.detach() ** 2 * v.detach(), **TOL)
    gx, gv = torch.autograd.grad(g.sum(), (x, v), create_graph=True)
    torch.testing.assert_close(gx, 6 * x.detach() * v.detach(), **TOL)
    torch.testing.assert_close(gv, 3 * x.detach() ** 2, **TOL)
    (third,) = torch.autograd.grad(gx.sum(), x)
    torch.testing.assert_close(third, 6 * v.detach(), **TOL)


def test_keyword_arguments_and_parameters_are_differentiated_twice(serve) -> None:
    def scaled(x, *, w):
        return (w * x ** 2).sum()

    _, f = local_and_remote(serve, scaled)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(f(x, w=w), x, create_graph=True)        # 2 w x
    hx, hw = torch.autograd.grad(gx.sum(), (x, w))
    torch.testing.assert_close(hx, 2 * w.detach(), **TOL)
    torch.testing.assert_close(hw, 2 * x.detach(), **TOL)


def test_torch_func_grad_keeps_a_vjp_only_when_it_is_differentiated_again(serve) -> None:
    server, client = serve({"f": cube})
    f = client.torch("f")
    x = torch.randn(4, dtype=torch.float64)
    g = torch.func.grad(f)(x)                                  # one level: nothing kept
    torch.testing.assert_close(g, 3 * x ** 2, **TOL)
    assert server.residuals.stats("f").count == 1           # the forward's (release queued)
    h = torch.func.grad(lambda v: torch.func.grad(f)(v).sum())(x)   # two: the inner kept
    torch.testing.assert_close(h, 6 * x, **TOL)
    client.describe("f")                                    # carries the queued releases
    assert server.residuals.stats("f").count == 0


def test_kept_vjps_whose_cotangents_lie_in_session_slots(serve) -> None:
    server, client = serve({"f": lambda x: torch.sin(x) * x})
    assert client.transport == "shm"
    f = client.torch("f")
    x = torch.randn(1 << 15, dtype=torch.float64, requires_grad=True)   # 256 KiB: in slots
    v = torch.randn(1 << 15, dtype=torch.float64)
    (g,) = torch.autograd.grad(f(x), x, grad_outputs=v, create_graph=True)
    assert client.session_info().copied >= 2     # x, then v, went through request slots
    for _ in range(3):                            # slots the kept Vjp views are not reused
        client.forward("f", (np.full(1 << 15, 7.0),))
    u = torch.randn(1 << 15, dtype=torch.float64)
    (h,) = torch.autograd.grad(g, x, grad_outputs=u)
    xd = x.detach()
    torch.testing.assert_close(g, (torch.cos(xd) * xd + torch.sin(xd)) * v, **TOL)
    torch.testing.assert_close(h, (2 * torch.cos(xd) - xd * torch.sin(xd)) * v * u, **TOL)


def test_every_lost_level_is_recomputed(serve) -> None:
    server, client = serve({"f": lambda x: torch.sin(x).prod()})
    f = client.torch("f")
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = f(x)
    server.residuals.clear()                                # the forward's is gone
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    assert client.recomputes == 1
    server.residuals.clear()                                # and the kept Vjp's
    (h,) = torch.autograd.grad(g.sum(), x)
    assert client.recomputes == 2
    xl = x.detach().requires_grad_(True)
    (gl,) = torch.autograd.grad(torch.sin(xl).prod(), xl, create_graph=True)
    (hl,) = torch.autograd.grad(gl.sum(), xl)
    torch.testing.assert_close(g, gl, **TOL)
    torch.testing.assert_close(h, hl, **TOL)


def test_kept_residuals_are_released_with_their_graph(serve) -> None:
    server, client = serve({"f": cube})
    f = client.torch("f")
    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    y = f(x)
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    assert server.residuals.stats("f").count == 2           # the forward's, the Vjp's
    del y, g
    client.describe("f")                                    # carries the queued releases
    assert server.residuals.stats("f").count == 0


def test_a_jax_endpoint_keeps_its_vjp_and_recomputes_every_level(serve) -> None:
    jax = pytest.importorskip("jax")
    w = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    server = Server("127.0.0.1", 0)
    server.add("p", gradserve.server.JaxEndpoint(
        lambda p, x: jax.numpy.tanh(jax.numpy.matmul(x, p, precision="highest")),
        params=jax.numpy.asarray(w)))
    server.start()
    try:
        with gradserve.connect(server.address) as client:
            assert client.describe("p").reverse_order == 0
            f = client.torch("p")
            x = torch.randn(2, 6, requires_grad=True)
            y = f(x)
            (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
            server.residuals.clear()                      # every level is recomputed:
            (h,) = torch.autograd.grad(g.pow(2).sum(), x)
            assert client.recomputes == 2   # the kept Vjp's, then (through its cotangent
            #                                 2y) the forward's
            xl = x.detach().requires_grad_(True)
            yl = torch.tanh(xl @ torch.from_numpy(w))
            (gl,) = torch.autograd.grad(yl.pow(2).sum(), xl, create_graph=True)
            (hl,) = torch.autograd.grad(gl.pow(2).sum(), xl)
            torch.testing.assert_close(g, gl, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h, hl, rtol=1e-5, atol=1e-5)
    finally:
        server.stop(grace=0)


def test_a_kept_vjp_of_a_batch_of_cotangents_is_refused_by_name_at_a_jax_endpoint(serve) -> None:
    jax = pytest.importorskip("jax")
    server = Server("127.0.0.1", 0)
    server.add_jax("jsin", jax.numpy.sin)
    server.start()
    try:
        stub = raw(server)
        reply = stub.ForwardUnary(pb.ForwardRequest(
            endpoint="jsin", need_vjp=True,
            args=codec.encode((np.ones(2, np.float32),), FrameWriter(), lambda _: True)))
        with pytest.raises(grpc.RpcError) as info:
            stub.VjpUnary(pb.VjpRequest(endpoint="jsin", residual_id=reply.residual_id,
                                        keep_graph=True, batched_cotangents=True,
                                        cotangents=codec.encode(np.ones((3, 2), np.float32),
                                                                FrameWriter())))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert info.value.details() == ("endpoint 'jsin' (jax) keeps the graph of a Vjp with "
                                        "one set of cotangents, not a batch of them")
        assert server.residuals.stats().count == 1       # the forward's, still usable
    finally:
        server.stop(grace=0)


def test_an_endpoint_without_higher_order_refuses_a_kept_vjp_and_its_gradients_say_so(
        serve) -> None:
    class FirstOrder(gradserve.server.TorchEndpoint):
        reverse_order = 1
        run_vjp_kept = gradserve.server.Endpoint.run_vjp_kept

    server, client = serve({"f": FirstOrder(lambda x: x ** 3)})
    assert client.describe("f").reverse_order == 1
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(client.torch("f")(x).sum(), x, create_graph=True)
    torch.testing.assert_close(g, 3 * x.detach() ** 2, **TOL)       # first order: fine
    with pytest.raises(RuntimeError, match="the gradient of remote endpoint 'f' cannot be "
                       "differentiated .*: its endpoint serves first-order reverse mode only"):
        torch.autograd.grad(g.sum(), x)
    stub = raw(server)                        # and a kept Vjp asked for all the same:
    reply = stub.ForwardUnary(pb.ForwardRequest(
        endpoint="f", need_vjp=True,
        args=codec.encode((np.ones(2),), FrameWriter(), lambda _: True)))
    with pytest.raises(grpc.RpcError) as info:
        stub.VjpUnary(pb.VjpRequest(endpoint="f", residual_id=reply.residual_id,
                                    keep_graph=True,
                                    cotangents=codec.encode(np.ones(2), FrameWriter())))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == ("endpoint 'f' (torch) serves first-order reverse mode "
                                    "only: its gradients cannot be differentiated again")


def test_a_share_of_a_merged_run_is_recomputed_alone_for_a_kept_vjp() -> None:
    from test_batching import crowd, since, stats

    server = Server("127.0.0.1", 0)
    server.add_torch("f", lambda x: x ** 3, batchable=True, max_batch=8, max_delay=1.0)
    server.start()
    try:
        before = crowd(server.address, "f", np.ones((1, 2)))
        results: list = [None, None]
        gate = threading.Barrier(2)

        def run(i: int) -> None:
            with gradserve.connect(server.address, transport="grpc") as client:
                x = torch.full((1, 2), float(i + 1), dtype=torch.float64, requires_grad=True)
                gate.wait()
                y = client.torch("f")(x)
                (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
                (h,) = torch.autograd.grad(g.sum(), x)
                results[i] = (g.detach(), h, client.recomputes)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, (g, h, recomputes) in enumerate(results):
            torch.testing.assert_close(g, torch.full((1, 2), 3.0 * (i + 1) ** 2,
                                                     dtype=torch.float64))
            torch.testing.assert_close(h, torch.full((1, 2), 6.0 * (i + 1), dtype=torch.float64))
            # its forward was a share of a merged run, which keeps no graph of its own: the
            # server recomputed it from the share's inputs, the client re-sent nothing
            assert recomputes == 0
        runs, calls = since(before, stats(server.address, "f"))[:2]
        assert (runs, calls) == (1, 2)
    finally:
        server.stop(grace=0)


def test_a_jax_endpoint_with_static_arguments_serves_second_derivatives(serve, x64) -> None:
    """A kept Vjp of a call with static arguments (a name, a number) leaves them out of the
    gradients JAX differentiates again (they once made every second derivative fail)."""
    jax = pytest.importorskip("jax")
    from gradserve.server.jax_endpoint import JaxEndpoint

    def local(x, *, k, mode):
        return torch.sin(x) * k * (x ** 2).sum() if mode == "wave" else x

    server, client = serve({"s": JaxEndpoint(
        lambda x, *, k, mode: jax.numpy.sin(x) * k * jax.numpy.sum(x ** 2) if mode == "wave"
        else x)})
    f = client.torch("s")
    x = torch.randn(3, dtype=torch.float64)
    got = torch.autograd.functional.hessian(lambda v: torch.tanh(f(v, k=2, mode="wave")).sum(), x)
    want = torch.autograd.functional.hessian(lambda v: torch.tanh(local(v, k=2, mode="wave")).sum(), x)
    torch.testing.assert_close(got, want, **TOL)
