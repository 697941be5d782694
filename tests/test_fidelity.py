"""What local ops take travels: dtypes, devices, memory formats, layouts, slices, Ellipsis,
complex scalars and named tuples (torch.return_types too); what cannot travel is refused,
naming the argument."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest
import torch

import gradserve
from gradserve import frameworks
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import codec
from gradserve.wire.framing import FrameReader, FrameWriter
from helpers import raw

Point = collections.namedtuple("Point", ["x", "y"])


def roundtrip(tree: Any, statics: Any = None) -> Any:
    writer = FrameWriter()
    value = codec.encode(tree, writer)
    reader: FrameReader[Any] = FrameReader(1 << 30)
    make = statics.from_wire if statics is not None else frameworks.adapter("numpy").from_wire
    return codec.decode(reader.read_header(value), reader, lambda w, p: make(w),
                        statics=statics)


def test_static_leaves_round_trip() -> None:
    tree = (slice(1, None, -2), Ellipsis, 1 + 2j, slice(None), Point(3, "a"))
    assert roundtrip(tree) == tree
    assert type(roundtrip(tree)[4]).__name__ == "Point"
    torch_statics = frameworks.adapter("torch")
    assert roundtrip([torch.float64, torch.device("cuda:1"), torch.channels_last,
                      torch.strided], torch_statics) == [
        torch.float64, torch.device("cuda:1"), torch.channels_last, torch.strided]
    assert roundtrip([torch.bfloat16, np.float32, np.dtype("int8")]) == [
        np.dtype(frameworks.adapter("numpy").constant("dtype", "bfloat16")), np.dtype("float32"),
        np.dtype("int8")]
    found = roundtrip(torch.max(torch.ones(2, 3), dim=1), torch_statics)
    assert type(found) is torch.return_types.max and found.indices.tolist() == [0, 0]
    with pytest.raises(TypeError, match=r"args\[1\]: torch dtype torch.complex32 cannot be "):
        codec.encode((1, torch.complex32), FrameWriter(), path="args")


@pytest.fixture
def ops(serve) -> tuple[Any, gradserve.Client]:
    server, client = serve({
        "softmax": lambda x, dtype=None: torch.softmax(x, -1, dtype=dtype),
        "to": lambda x, dtype, device=None, memory_format=torch.preserve_format: x.to(
            dtype=dtype, device=device, memory_format=memory_format),
        "index": lambda x, idx: x[idx],
        "max": lambda x: torch.max(x, dim=1),
        "sort": lambda x: torch.sort(x, dim=-1, descending=True),
        "scale": lambda x, c: (x * c).real,
        "point": lambda p: Point(p.y * 2, p.x.sum()),
        "zeros": lambda shape, dtype, layout: torch.zeros(shape, dtype=dtype, layout=layout),
    }, client_options={"transport": "grpc"})
    return server, client


def test_dtype_arguments_change_what_runs_and_gradients_follow(ops) -> None:
    _, client = ops
    x = torch.randn(3, 4, dtype=torch.float32, requires_grad=True)
    y = client.torch("softmax")(x, dtype=torch.float64)
    assert y.dtype == torch.float64
    (y * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    xl = x.detach().requires_grad_()
    (torch.softmax(xl, -1, dtype=torch.float64) * torch.arange(4.0, dtype=torch.float64)
     ).sum().backward()
    torch.testing.assert_close(x.grad, xl.grad, rtol=0, atol=0)
    half = client.torch("to")(x, torch.float16, device=torch.device("cuda:3"),   # the server's
                              memory_format=torch.contiguous_format)            # device is used
    assert half.dtype == torch.float16 and half.device == torch.device("cpu")
    zeros = client.torch("zeros")((2, 3), torch.int16, torch.strided)
    assert zeros.dtype == torch.int16 and zeros.shape == (2, 3)
    import jax.numpy as jnp   # JAX's and numpy's dtypes name the same wire dtype
    for dtype in (jnp.float64, np.float64, np.dtype("float64")):
        out = client.forward("softmax", (np.ones((2, 3), np.float32),), {"dtype": dtype})
        assert out.outputs.dtype == np.float64


@pytest.mark.parametrize("index", [
    (Ellipsis, slice(1, 3)), (slice(None, None, -1),), (0, slice(None, None, 2)),
    (slice(-2, None), Ellipsis), (None, Ellipsis, 1),
])
def test_indexing_with_slices_and_ellipsis(ops, index) -> None:
    _, client = ops
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    if index == (slice(None, None, -1),):   # torch cannot step backwards; so it is refused
        with pytest.raises(gradserve.RemoteError, match="step must be greater than zero"):
            client.torch("index")(x, index)
        return
    out = client.torch("index")(x, index)
    torch.testing.assert_close(out, x[index])
    out.pow(2).sum().backward()
    xl = x.detach().requires_grad_()
    xl[index].pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xl.grad)


def test_return_types_and_named_tuples_come_back_as_themselves(ops) -> None:
    _, client = ops
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    found = client.torch("max")(x)
    want = torch.max(x, dim=1)
    assert type(found) is torch.return_types.max
    torch.testing.assert_close(found.values, want.values)
    assert torch.equal(found.indices, want.indices)
    found.values.sum().backward()
    xl = x.detach().requires_grad_()
    torch.max(xl, dim=1).values.sum().backward()
    torch.testing.assert_close(x.grad, xl.grad)
    ordered = client.torch("sort")(x)
    assert type(ordered) is torch.return_types.sort and ordered.indices.dtype == torch.int64
    p = client.torch("point")(Point(torch.ones(2, requires_grad=True), torch.full((2,), 3.0)))
    assert type(p).__name__ == "Point" and p._fields == ("x", "y")
    torch.testing.assert_close(p.x, torch.full((2,), 6.0))
    low = client.forward("max", (np.ones((2, 3), np.float32),)).outputs
    assert type(low).__name__ == "max" and low._fields == ("values", "indices")
    np.testing.assert_array_equal(low.indices, [0, 0])


def test_complex_scalars_travel(ops) -> None:
    _, client = ops
    x = torch.randn(4, dtype=torch.complex128, requires_grad=True)
    out = client.torch("scale")(x, 1 - 2j)
    torch.testing.assert_close(out, (x * (1 - 2j)).real)


@pytest.mark.filterwarnings("ignore::UserWarning")   # torch on quantized and complex32 tensors
def test_what_cannot_travel_is_refused_naming_it(ops) -> None:
    server, client = ops
    f = client.torch("scale")
    dense = torch.eye(3)
    cases = [
        ((dense.to_sparse(), 2.0), r"args\[0\]: a sparse_coo tensor cannot be sent.*to_dense"),
        ((torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8), 2.0),
         r"args\[0\]: a quantized tensor cannot be sent; send x.dequantize\(\)"),
        ((dense.to(torch.complex32), 2.0), r"args\[0\]: torch dtype torch.complex32 cannot"),
        ((dense, torch.nn.Linear(2, 2)), r"args\[1\]: cannot send a torch.nn.modules.linear"),
        ((dense, len), r"args\[1\]: cannot send a builtins.builtin_function_or_method"),
    ]
    for args, message in cases:
        with pytest.raises(TypeError, match=message):
            f(*args)
    stub = raw(server)
    bad = [
        (pb.Value(constant=pb.Constant(kind="dtype", name="float128")),
         "args[0]: unsupported dtype 'float128'"),
        (pb.Value(constant=pb.Constant(kind="layout", name="__class__")),
         "args[0]: torch has no layout called '__class__'"),
        (pb.Value(constant=pb.Constant(kind="color", name="red")),
         "args[0]: torch has no color called 'red'"),
        (pb.Value(named_value=pb.NamedSequence(type_name="P", fields=["a", "b"],
                                               items=[pb.Value(int_value=1)])),
         "args[0]: named tuple has 2 fields but 1 items"),
        (pb.Value(named_value=pb.NamedSequence(type_name="P", fields=["a", "1x"],
                                               items=[pb.Value(int_value=1)] * 2)),
         "args[0]: named tuple 'P'"),
    ]
    for leaf, message in bad:
        request = pb.ForwardRequest(endpoint="index")
        request.args.tuple_value.items.add().CopyFrom(leaf)
        request.args.tuple_value.items.add().int_value = 0
        with pytest.raises(Exception) as caught:
            stub.ForwardUnary(request, timeout=10)
        assert caught.value.code().name == "INVALID_ARGUMENT", caught.value
        assert message in caught.value.details()


def test_jax_clients_and_endpoints_take_dtypes_and_named_tuples(serve) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from gradserve.server import Server
    Pair = collections.namedtuple("Pair", ["low", "high"])
    server = Server("127.0.0.1", 0)
    server.add_jax("cast", lambda x, dtype: jnp.asarray(x * 3, dtype))
    server.add_jax("split", lambda x: Pair(jnp.minimum(x, 0.0), jnp.maximum(x, 0.0)))
    server.start()
    try:
        with gradserve.connect(server.address, transport="grpc") as client:
            x = jnp.linspace(-1.0, 1.0, 4)            # no 0: max's gradient splits ties
            out = client.jax("cast")(x, jnp.float16)
            assert out.dtype == jnp.float16
            np.testing.assert_allclose(np.asarray(out), np.asarray(x * 3), rtol=1e-3)
            g = jax.grad(lambda v: client.jax("cast")(v, jnp.float32).sum())(x)
            np.testing.assert_allclose(np.asarray(g), np.full(4, 3.0))
            pair = client.jax("split")(x)
            assert type(pair).__name__ == "Pair" and pair._fields == ("low", "high")
            g = jax.grad(lambda v: client.jax("split")(v).high.sum())(x)
            np.testing.assert_allclose(np.asarray(g), (np.asarray(x) > 0).astype(np.float32))
            low = client.forward("cast", (np.ones(2, np.float32), torch.float16)).outputs
            assert low.dtype == np.float16      # a torch dtype to a JAX endpoint: numpy's
    finally:
        server.stop(grace=0)


def test_describe_says_which_derivatives_an_endpoint_gives(ops) -> None:
    _, client = ops
    info = client.describe("max")
    assert (info.reverse_order, info.forward_mode) == (0, True)      # torch: any order, Jvp
    assert {(e.reverse_order, e.forward_mode) for e in client.endpoints()} == {(0, True)}
