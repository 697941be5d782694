"""Careless or hostile clients: what they send is bounded, what they leave is reclaimed,
and a legitimate call still goes through (real sockets on loopback, small limits)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.client.transports import shm
from gradserve.server import Server
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from models import mlp


def raw(server: Server) -> pb_grpc.GradserveStub:
    return pb_grpc.GradserveStub(grpc.insecure_channel(server.address))


def legitimate_call_works(client: gradserve.Client) -> None:
    """A normal forward+backward still succeeds, quickly."""
    start = time.monotonic()
    x = torch.randn(3, 6, requires_grad=True)
    client.torch("mlp")(x).sum().backward()
    assert x.grad is not None and time.monotonic() - start < 2.0


def test_echoed_strings_are_cut_and_the_reason_survives(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"})
    stub = raw(server)
    with pytest.raises(grpc.RpcError) as info:
        stub.Describe(pb.DescribeRequest(endpoint="e" * (1 << 20)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "(1048576 characters)" in info.value.details() and len(info.value.details()) < 300
    request = pb.VjpRequest(endpoint="mlp", residual_id="r" * (1 << 20),
                            cotangents=pb.Value(none=pb.NoneValue()))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Vjp(iter([pb.VjpFrame(header=request)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("gradserve-reason", "residual-missing") in info.value.trailing_metadata()
    header = pb.ForwardRequest(endpoint="mlp", session=pb.SessionState(id="s" * (1 << 20)))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Forward(iter([pb.ForwardFrame(header=header)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("gradserve-reason", "session-missing") in info.value.trailing_metadata()
    # a message built from client strings (a 1 MiB keyword name) is cut to fit a status
    bad = pb.ForwardRequest(endpoint="mlp", args=pb.Value(tuple_value=pb.Sequence(
        items=[pb.Value(int_value=1)])), kwargs=pb.Value(dict_value=pb.Mapping(
            keys=["k" * (1 << 20)], values=[pb.Value(int_value=1)])))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Forward(iter([pb.ForwardFrame(header=bad)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected keyword argument 'kkkk" in info.value.details()
    assert "more characters)" in info.value.details()
    legitimate_call_works(client)


def test_a_huge_pytree_is_refused_before_any_work(serve) -> None:
    server, client = serve({"mlp": mlp(), "count": lambda xs: len(xs)},
                           client_options={"transport": "grpc"}, max_request_values=1000)
    start = time.monotonic()
    with pytest.raises(gradserve.ResourceExhausted,
                       match="more than 1000 pytree nodes, this server's limit"):
        client.forward("count", ([0] * 5000,))
    assert time.monotonic() - start < 2.0
    assert client.forward("count", ([0] * 900,)).outputs == 900
    legitimate_call_works(client)


def test_stop_ends_within_its_bound_whatever_the_clients_did(monkeypatch) -> None:
    from gradserve.server import host

    monkeypatch.setattr(host, "STOP_SECONDS", 0.5)
    server = Server("127.0.0.1", 0)
    server.add_torch("mlp", mlp())
    server.start()
    channel = grpc.insecure_channel(server.address)
    garbage = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    never = threading.Event()

    def frames():
        yield b"\xff\xff\xff\xff not a reflection request"
        never.wait(30)

    calls = [garbage(frames(), timeout=30) for _ in range(8)]
    time.sleep(0.5)
    start = time.monotonic()
    server.stop(grace=0.5)
    assert time.monotonic() - start < 0.5 + 0.5 + 1.0
    never.set()
    for call in calls:
        call.cancel()
    channel.close()


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_declared_stream_sizes_cost_memory_only_as_bytes_arrive(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"})
    sizes = [8 << 20] * 10 + [20 << 20] * 2      # 32 MiB (heap) and 80 MiB (mapped) each
    header = pb.ForwardRequest(endpoint="mlp", args=pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[n], stream=pb.StreamedPayload(id=i)))
        for i, n in enumerate(sizes)])))
    frames = [pb.ForwardFrame(header=header)] + [
        pb.ForwardFrame(chunk=pb.Chunk(id=i, data=b"x")) for i in range(len(sizes))]
    before = resident_bytes()
    with pytest.raises(grpc.RpcError) as info:     # 480 MiB declared, 12 bytes sent
        list(raw(server).Forward(iter(frames), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream ended after 1 of 33554432 bytes" in info.value.details()
    assert resident_bytes() - before < 32 << 20
    legitimate_call_works(client)


def test_signature_never_allocates_what_a_client_declares(serve) -> None:
    from gradserve.wire.specs import TensorType

    def untraceable(x):
        return torch.from_numpy(x.numpy() * 2)    # fake tensors have no data: needs a dry run

    server, client = serve({"np": untraceable, "mlp": mlp()}, client_options={"transport": "grpc"})
    before = resident_bytes()
    with pytest.raises(gradserve.ResourceExhausted, match="a dry run would take 1073741824 bytes"):
        client.signature("np", (TensorType((1 << 28,), "float32"),))
    assert resident_bytes() - before < 64 << 20
    assert client.signature("np", (TensorType((3, 2), "float32"),)) == TensorType((3, 2), "float32")
    legitimate_call_works(client)


def test_a_jax_endpoint_keeps_a_bounded_number_of_compilations(serve) -> None:
    jax = pytest.importorskip("jax")
    from gradserve.server.jax_endpoint import JaxEndpoint

    endpoint = JaxEndpoint(jax.jit(lambda x, n: x * n), compile_cache=2)
    _, client = serve({"scale": endpoint, "mlp": mlp()}, client_options={"transport": "grpc"})
    for size in range(1, 7):                       # six shapes, and static values
        out = client.forward("scale", (np.ones(size, np.float32), size)).outputs
        np.testing.assert_array_equal(out, np.full(size, size, np.float32))
    assert endpoint.compiles == 6 and endpoint.cached == 2
    client.forward("scale", (np.ones(6, np.float32), 6))   # the most recent: no new compilation
    assert endpoint.compiles == 6
    legitimate_call_works(client)
