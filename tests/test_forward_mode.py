"""Forward mode through a remote endpoint: the Jvp RPC (outputs and their tangents for
tangents of the inputs), under torch.func.jvp, jacfwd and torch.autograd.forward_ad, for
torch and JAX endpoints, with every bad tangent refused by name."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwad

import gradserve
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import codec
from gradserve.wire.framing import FrameWriter
from helpers import raw
from models import mlp

TOL = dict(rtol=1e-10, atol=1e-10)


def test_torch_func_jvp_and_jacfwd_equal_local(serve) -> None:
    model = mlp(dtype=torch.float64)
    _, client = serve({"mlp": model})
    assert client.describe("mlp").forward_mode
    f = client.torch("mlp")
    x, t = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    out, tangent = torch.func.jvp(f, (x,), (t,))
    want_out, want = torch.func.jvp(model, (x,), (t,))
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(tangent, want, **TOL)
    torch.testing.assert_close(torch.func.jacfwd(f)(x[:2]), torch.func.jacfwd(model)(x[:2]),
                               **TOL)


def test_dual_tensors_of_forward_ad(serve) -> None:
    _, client = serve({"w": lambda x, y: torch.sin(x) * y.cos() + x * y})
    f = client.torch("w")
    x, y, t = (torch.randn(4, dtype=torch.float64) for _ in range(3))
    with fwad.dual_level():
        _, tangent = fwad.unpack_dual(f(fwad.make_dual(x, t), y))   # y has no tangent
    torch.testing.assert_close(tangent, (torch.cos(x) * y.cos() + y) * t, **TOL)


def test_an_op_without_forward_ad_is_differentiated_by_double_vjp(serve) -> None:
    class Cube(torch.autograd.Function):   # a backward, no jvp: no forward AD
        @staticmethod
        def forward(x):
            return x ** 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * g

    _, client = serve({"cube": Cube.apply})
    x, t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    _, tangent = torch.func.jvp(client.torch("cube"), (x,), (t,))
    torch.testing.assert_close(tangent, 3 * x ** 2 * t, **TOL)
    jac = torch.func.jacfwd(client.torch("cube"))(x)                 # batched tangents too
    torch.testing.assert_close(jac, torch.diag(3 * x ** 2), **TOL)


def test_a_jax_endpoint_serves_forward_mode(serve, x64) -> None:
    jax = pytest.importorskip("jax")
    server, client = serve({})
    server.add_jax("wave", lambda x, y: jax.numpy.sin(x) * jax.numpy.cos(y) + x * y)
    assert client.describe("wave").forward_mode
    f = client.torch("wave")
    x, y, tx, ty = (torch.randn(3, dtype=torch.float64) for _ in range(4))
    _, tangent = torch.func.jvp(f, (x, y), (tx, ty))
    want = (torch.cos(x) * y.cos() + y) * tx + (-torch.sin(x) * y.sin() + x) * ty
    torch.testing.assert_close(tangent, want, **TOL)
    torch.testing.assert_close(torch.func.jacfwd(f)(x, y), torch.diag(torch.cos(x) * y.cos() + y),
                               **TOL)


def test_the_low_level_jvp_mirrors_outputs_and_batches(serve) -> None:
    _, client = serve({"split": lambda x, n: {"sq": x ** 2, "n": n, "idx": x.argmax()}})
    x = np.arange(1.0, 4.0)
    outputs, tangents = client.jvp("split", (x, 7), (np.ones(3), None))
    assert outputs["n"] == 7 and tangents["n"] == 7 and tangents["idx"] is None
    np.testing.assert_allclose(tangents["sq"], 2 * x)
    _, batched = client.jvp("split", (x, 7), (np.eye(3), None), batched=True)
    np.testing.assert_allclose(batched["sq"], np.diag(2 * x))


@pytest.mark.parametrize("tangents, message", [
    ((np.ones(4),), "tangent for input tensor #0: expected float64[3], got float64[4]"),
    ((np.ones(3, np.float32),), "tangent for input tensor #0: expected float64[3], got "
                                "float32[3]"),
    ((np.ones(3), np.ones(2)), "tangents"),
    (("x",), "tangent for input tensor #0 must be a tensor or None, got str"),
])
def test_bad_tangents_are_refused_by_name(serve, tangents, message) -> None:
    server, client = serve({"sq": lambda x: x ** 2})
    with pytest.raises(gradserve.InvalidArgument, match=message.replace("[", r"\[")):
        client.jvp("sq", (np.ones(3),), tangents)


def test_a_tangent_for_an_integer_input_is_refused(serve) -> None:
    server, _ = serve({"shift": lambda x, k: x + k})
    request = pb.JvpRequest(endpoint="shift")
    writer = FrameWriter()
    request.args.CopyFrom(codec.encode((np.ones(2), np.arange(2)), writer))
    request.tangents.args.CopyFrom(codec.encode((None, np.ones(2, np.int64)), writer))
    with pytest.raises(grpc.RpcError) as info:
        raw(server).JvpUnary(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("tangent for input tensor #1: a int64 input has no "
                                    "tangents (only floating and complex tensors do)")


def test_torch_func_hessian_and_vmaps_of_jvp_and_jacrev_equal_local(serve) -> None:
    model = mlp(dtype=torch.float64)
    _, client = serve({"mlp": model})
    f = client.torch("mlp")
    func = torch.func
    x, v = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    xs = torch.randn(3, 1, 6, dtype=torch.float64)
    for run in [lambda g: func.hessian(lambda a: torch.sin(g(a)).sum())(x),
                lambda g: func.vmap(lambda a: func.jvp(g, (a,), (v,))[1])(xs),
                lambda g: func.vmap(lambda a, t: func.jvp(g, (a,), (t,)))(xs, 2 * xs),
                lambda g: func.vmap(func.jacfwd(g))(xs),
                lambda g: func.jacfwd(func.vmap(g))(xs),
                lambda g: func.vmap(func.jacrev(g))(xs),   # per-sample Jacobians
                lambda g: func.vmap(func.jacrev(lambda a: torch.sin(g(a))))(xs)]:
        torch.testing.assert_close(run(f), run(model), **TOL)
    for hessians in [lambda a: f(a).sum(), lambda a: torch.sin(f(a)).sum()]:
        with pytest.raises(NotImplementedError, match="vmap of hessian"):
            func.vmap(func.hessian(hessians))(xs)
    with pytest.raises(NotImplementedError, match="more than one vmap besides jacfwd's"):
        func.vmap(func.vmap(lambda a: func.jvp(f, (a,), (v,))[1]))(xs[None].expand(2, 3, 1, 6))


def test_a_jvp_too_large_for_one_message_streams(serve) -> None:
    _, client = serve({"w": lambda x: torch.sin(x) * x}, client_options={"transport": "grpc"})
    x, t = (torch.randn(1 << 20, dtype=torch.float64) for _ in range(2))   # 8 MiB each
    out, tangent = torch.func.jvp(client.torch("w"), (x,), (t,))
    torch.testing.assert_close(out, torch.sin(x) * x, **TOL)
    torch.testing.assert_close(tangent, (torch.cos(x) * x + torch.sin(x)) * t, **TOL)


def test_torch_func_second_order_in_any_mode_and_what_it_refuses(serve) -> None:
    """jvp of jvp, jacfwd of jacfwd, grad of jvp and jacrev of jacfwd equal local torch (they
    once came back silently wrong: the jvp rule's values dropped the outer transform; now the
    rule's result is a Vjp node the outer transform sees); beyond second order through a
    forward-mode rule, it refuses by name rather than answer wrong."""
    model = mlp(dtype=torch.float64)
    _, client = serve({"mlp": model})
    f = client.torch("mlp")
    func = torch.func
    x, v = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    served = [
        lambda g: func.jvp(lambda a: func.jvp(g, (a,), (v,))[1], (x,), (v,))[1],
        lambda g: func.jvp(lambda a: torch.sin(func.jvp(lambda b: torch.sin(g(b)), (a,),
                                                        (v,))[1]), (x,), (2 * v,))[1],
        lambda g: func.jacfwd(func.jacfwd(lambda a: torch.sin(g(a))))(x),
        lambda g: func.grad(lambda a: torch.sin(func.jvp(g, (a,), (v,))[1]).sum())(x),
        lambda g: func.jvp(lambda t: func.jvp(g, (x,), (t,))[1], (v,), (x,))[1],
        lambda g: func.jacrev(func.jacfwd(g))(x),
        lambda g: func.grad(lambda a: func.grad(lambda b: torch.sin(
            func.jvp(g, (b,), (v,))[1]).sum())(a).pow(2).sum())(x),
        lambda g: func.jvp(func.grad(lambda a: torch.sin(g(a)).sum()), (x,), (v,))[1],
        lambda g: func.jacfwd(func.jacrev(g))(x),
        lambda g: func.jacrev(func.jacrev(func.jacrev(lambda a: torch.sin(g(a)).sum())))(x),
    ]
    for run in served:
        torch.testing.assert_close(run(f), run(model), **TOL)
    refused = [
        lambda g: func.jacfwd(func.hessian(lambda a: torch.sin(g(a)).sum()))(x),
        lambda g: func.jvp(lambda a: func.jvp(lambda b: func.jvp(g, (b,), (v,))[1], (a,),
                                              (v,))[1], (x,), (v,)),
        lambda g: func.jvp(lambda a: func.jvp(func.grad(lambda b: torch.sin(g(b)).sum()),
                                              (a,), (v,))[1], (x,), (v,)),
    ]
    for run in refused:
        with pytest.raises(NotImplementedError, match="beyond second order"):
            run(f)
