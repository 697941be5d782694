"""The wire codec and the bytes transport: exact round trips and strict validation."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from gradserve.wire import codec
from gradserve.errors import StatusError
from gradserve.frameworks.torch import ADAPTER as TORCH
from gradserve.wire.framing import FrameReader, FrameWriter
from gradserve.v1 import gradserve_pb2 as pb
from helpers import resident_bytes

ALL_TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                    torch.float16, torch.bfloat16, torch.float32, torch.float64,
                    torch.complex64, torch.complex128]


def roundtrip(tree, chunk_bytes=1 << 20, inline_bytes=None, make_leaf=None):
    writer = FrameWriter(chunk_bytes, inline_bytes)
    value = codec.encode(tree, writer, path="tree")
    frames = list(writer.frames(pb.GetParametersFrame, value))
    reader = FrameReader(1 << 40)
    header = reader.read(frames)
    leaf = make_leaf or (lambda w, path: TORCH.from_wire(w))
    return codec.decode(header, reader, leaf), frames


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_every_dtype_roundtrips_bit_exact(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    src = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 100)
    t = src.to(dtype) if not dtype.is_complex else torch.complex(src, -src).to(dtype)
    out, _ = roundtrip(t)
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out, t)


def test_bfloat16_travels_as_two_bytes_per_element() -> None:
    t = torch.randn(1000, dtype=torch.bfloat16)
    _, frames = roundtrip(t)
    assert len(frames[0].header.tensor.data) == 2000
    assert frames[0].header.tensor.dtype == pb.BFLOAT16


def test_pytree_with_static_leaves_and_views() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tree = {"a": (base.t(), [None, True, 3, 2.5, "s"]), "b": {"c": base[:, 1], "d": []},
            "scalar": torch.tensor(7.0), "empty": torch.zeros(0, 3), "conj": torch.tensor([1 + 2j]).conj()}
    out, _ = roundtrip(tree)
    assert out["a"][1] == [None, True, 3, 2.5, "s"]
    assert type(out["a"]) is tuple and type(out["a"][1]) is list
    assert torch.equal(out["a"][0], base.t())
    assert torch.equal(out["b"]["c"], base[:, 1])
    assert out["b"]["d"] == []
    assert out["scalar"].shape == () and out["scalar"].item() == 7.0
    assert out["empty"].shape == (0, 3)
    assert torch.equal(out["conj"], torch.tensor([1 - 2j]))


def test_numpy_leaves_roundtrip() -> None:
    arr = np.arange(10, dtype=np.int16).reshape(2, 5)
    out, _ = roundtrip({"x": arr}, make_leaf=lambda w, p: np.frombuffer(w.data, np.int16).reshape(w.shape))
    np.testing.assert_array_equal(out["x"], arr)


def test_large_tensor_is_streamed_in_bounded_chunks() -> None:
    t = torch.randn(300_000)  # 1.2 MB
    out, frames = roundtrip((t, torch.ones(3)), chunk_bytes=64 << 10)
    assert torch.equal(out[0], t)
    assert frames[0].header.tuple_value.items[0].tensor.WhichOneof("payload") == "stream"
    assert frames[0].header.tuple_value.items[1].tensor.WhichOneof("payload") == "data"
    chunks = frames[1:]
    assert len(chunks) == -(-t.numel() * 4 // (64 << 10))
    assert max(len(f.chunk.data) for f in chunks) == 64 << 10


@pytest.mark.parametrize("bad, message", [
    (object(), "cannot send a builtins.object"),
    ({1: torch.ones(1)}, "dict keys must be str"),
    ([2**70], "does not fit in int64"),
    (torch.ones(2, dtype=torch.uint16), "cannot be sent"),
])
def test_unencodable_values_name_the_problem(bad, message) -> None:
    with pytest.raises(TypeError, match=message):
        codec.encode(bad, FrameWriter())


def nested(depth: int) -> object:
    """``depth`` containers, one inside the other."""
    tree: object = {"leaf": 1}
    for _ in range(depth - 1):
        tree = [tree]
    return tree


def test_pytrees_nest_as_deep_as_protobuf_parses_and_no_deeper() -> None:
    request = pb.ForwardRequest(endpoint="f")
    ok = nested(codec.MAX_DEPTH - 1)           # inside kwargs, a container too
    codec.encode_into(request.kwargs, {"x": ok}, FrameWriter(), path="kwargs")
    parsed = pb.ForwardRequest.FromString(request.SerializeToString())
    assert codec.decode(parsed.kwargs, FrameReader(0), TORCH.from_wire)["x"] == ok
    with pytest.raises(TypeError, match=r"^kwargs\['x'\](\[0\]){31}: pytrees nest at most 32 "):
        codec.encode_into(pb.Value(), {"x": nested(codec.MAX_DEPTH)}, FrameWriter(),
                          path="kwargs")


def tensor_frames(dtype=pb.FLOAT32, shape=(2, 3), data=None, stream=None, chunks=()):
    header = pb.Value(tensor=pb.Tensor(dtype=dtype, shape=list(shape)))
    if stream is not None:
        header.tensor.stream.id = stream
    else:
        header.tensor.data = data if data is not None else bytes(24)
    return [pb.GetParametersFrame(header=header)] + [
        pb.GetParametersFrame(chunk=pb.Chunk(id=i, data=d)) for i, d in chunks]


@pytest.mark.parametrize("frames, code, message", [
    (tensor_frames(data=bytes(23)), grpc.StatusCode.INVALID_ARGUMENT, "payload has 23 bytes"),
    (tensor_frames(dtype=99), grpc.StatusCode.INVALID_ARGUMENT, "unknown wire dtype 99"),
    (tensor_frames(shape=(2, -3)), grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
    (tensor_frames(stream=0, chunks=[(0, bytes(10))]), grpc.StatusCode.INVALID_ARGUMENT,
     "stream ended after 10 of 24 bytes"),
    (tensor_frames(stream=0, chunks=[(0, bytes(20)), (0, bytes(8))]),
     grpc.StatusCode.INVALID_ARGUMENT, "more than the 24 bytes"),
    (tensor_frames(stream=0, chunks=[(5, bytes(24))]), grpc.StatusCode.INVALID_ARGUMENT,
     "unknown stream id 5"),
    (tensor_frames(shape=(1 << 40, 1 << 20), stream=0), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "over the limit"),
    ([], grpc.StatusCode.INVALID_ARGUMENT, "must start with a header"),
])
def test_reader_rejects_malformed_streams_before_allocating(frames, code, message) -> None:
    with pytest.raises(StatusError, match=message) as info:
        FrameReader(1 << 30).read(frames)
    assert info.value.code == code


def test_reader_accepts_interleaved_chunks() -> None:
    a, b = torch.arange(6, dtype=torch.float32), torch.arange(6, 12, dtype=torch.float32)
    header = pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[6], stream=pb.StreamedPayload(id=0))),
        pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[6], stream=pb.StreamedPayload(id=1)))]))
    ab, bb = a.numpy().tobytes(), b.numpy().tobytes()
    frames = [pb.GetParametersFrame(header=header)] + [
        pb.GetParametersFrame(chunk=pb.Chunk(id=i, data=d))
        for i, d in [(1, bb[:8]), (0, ab[:12]), (1, bb[8:]), (0, ab[12:])]]
    reader = FrameReader(1 << 20)
    out = codec.decode(reader.read(frames), reader, lambda w, p: TORCH.from_wire(w))
    assert torch.equal(out[0], a) and torch.equal(out[1], b)


def test_pytree_holds_no_reference_cycles() -> None:
    """Leaves must die with their last reference, not wait for the cycle collector."""
    import gc
    import weakref

    from gradserve.wire import pytree

    gc.disable()
    try:
        t = torch.ones(3)
        ref = weakref.ref(t)
        leaves, treedef = pytree.flatten({"a": [t, 1]}, lambda x: isinstance(x, torch.Tensor))
        tree = pytree.unflatten(treedef, leaves)
        del t, leaves, tree
        assert ref() is None
    finally:
        gc.enable()


def test_static_leaves_compare_by_type_and_exact_value() -> None:
    from gradserve.wire import pytree

    defs = [pytree.flatten(v, lambda x: False)[1] for v in (1, 1.0, True, 0.0, -0.0, "1")]
    assert len(set(defs)) == 6
    assert pytree.flatten((1, "a"), lambda x: False)[1] == pytree.flatten((1, "a"), lambda x: False)[1]


@pytest.mark.parametrize("shape, match", [
    ([1] * 65, "65 dimensions, more than the 64"),
    ([0, 2**40, 2**40], "overflows 64-bit indexing"),
])
def test_reader_rejects_absurd_shapes(shape, match) -> None:
    with pytest.raises(StatusError, match=match) as info:
        FrameReader(1 << 30).read(tensor_frames(shape=shape, data=b""))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="Linux only")
def test_declared_size_is_not_committed_before_the_bytes_arrive() -> None:
    header = pb.Value(tensor=pb.Tensor(dtype=pb.UINT8, shape=[1 << 30], stream=pb.StreamedPayload(id=0)))
    frames = [pb.GetParametersFrame(header=header),
              pb.GetParametersFrame(chunk=pb.Chunk(id=0, data=b"x"))]
    before = resident_bytes()
    reader = FrameReader(2 << 30)
    with pytest.raises(StatusError, match="stream ended after 1 of 1073741824 bytes"):
        reader.read(frames)
    assert resident_bytes() - before < 64 << 20


@pytest.mark.parametrize("make", [
    lambda: torch.tensor(2.0).expand(1),                                  # one element, stride 0
    lambda: torch.tensor([[3.0]]).expand(1, 1),
    lambda: torch.block_diag(torch.ones(1, 1), torch.ones(1, 1))[:1, :1],
    lambda: torch.tensor(5.0).expand(1, 1, 1).permute(2, 0, 1),
], ids=["expand", "expand-2d", "block-diag-slice", "permuted"])
def test_one_element_tensors_with_unusual_strides_roundtrip(make) -> None:
    t = make()
    out, _ = roundtrip(t)
    assert out.shape == t.shape and torch.equal(out, t)


def test_autograd_zero_tensors_travel_as_zeros() -> None:
    z = torch._efficientzerotensor(2, 3, dtype=torch.float64)
    out, _ = roundtrip({"g": z})
    assert out["g"].dtype == torch.float64 and torch.equal(out["g"], torch.zeros(2, 3, dtype=torch.float64))


def test_adapters_are_found_by_the_arrays_module_without_prior_imports() -> None:
    import subprocess
    import sys
    code = ("import sys, gradserve.frameworks as f; "
            "assert 'gradserve.frameworks.torch' not in sys.modules; "
            "import torch; a = f.adapter_for(torch.ones(2)); "
            "print(a.name, f.adapter_for(torch.nn.Parameter(torch.ones(1))).name, "
            "f.adapter_for(1.0), f.adapter_for(__import__('numpy').float32(1)).name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "torch", "None", "numpy"]


def test_a_tensor_type_equals_the_spec_without_wildcards_that_matches_it() -> None:
    from gradserve import TensorSpec, TensorType

    assert TensorType((3, 2), "float64") == TensorSpec((3, 2), "float64")
    assert TensorSpec((3, 2), "float64") == TensorType((3, 2), "float64")
    assert TensorType((3, 2), "float64") != TensorSpec((None, 2), "float64")
    assert TensorType((3, 2), "float64") != TensorSpec((3, 2), "float32")
    assert len({TensorType((3,), "int8"), TensorSpec((3,), "int8")}) == 1
