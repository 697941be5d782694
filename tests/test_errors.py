"""Every bad input gets a precise status and message, and the server keeps serving."""

from __future__ import annotations

import re
import time

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.server.torch_endpoint import TorchEndpoint
from gradserve.wire.specs import TensorSpec, TensorType
from gradserve.v1 import gradserve_pb2 as pb
from helpers import raw
from models import mlp


def boom(x):
    raise ValueError(f"bad value {x.shape[0]}")


def slow(x):
    time.sleep(1.0)
    return x * 2


def returns_object(x):
    return {"y": x, "oops": object()}


@pytest.fixture
def env(serve):
    server, client = serve({
        "mlp": mlp(),
        "spec": TorchEndpoint(lambda x, y=None: x.sum(),
                              inputs={"x": TensorSpec((None, 3), "float32"),
                                      "y": TensorSpec((2,), None)}),
        "boom": boom, "slow": slow, "object": returns_object, "tree": lambda d: {"a": d["a"] * 2},
    }, max_request_bytes=1 << 20)
    return server, client


def check(exc_info, code):
    assert exc_info.value.code == code
    assert isinstance(exc_info.value, gradserve.RemoteError)


def test_unknown_endpoint_is_not_found(env) -> None:
    _, client = env
    for call in (lambda: client.describe("nope"), lambda: client.forward("nope", (np.ones(1),)),
                 lambda: client.parameters("nope"), lambda: client.torch("nope")(torch.ones(1))):
        with pytest.raises(gradserve.NotFound, match="no endpoint named 'nope'.*mlp") as info:
            call()
        check(info, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("args, kwargs, match", [
    ((), {}, "missing a required argument: 'input'"),
    ((np.ones((1, 6), np.float32), np.ones(1)), {}, "too many positional arguments"),
    ((np.ones((1, 6), np.float32),), {"extra": 1}, "unexpected keyword argument 'extra'"),
])
def test_wrong_arity_is_invalid_argument(env, args, kwargs, match) -> None:
    _, client = env
    fitting = (np.ones((1, 6), np.float32),)
    client.forward("mlp", fitting)   # a call that fits does not let a wrong one through
    with pytest.raises(gradserve.InvalidArgument, match=match) as info:
        client.forward("mlp", args, kwargs)
    check(info, grpc.StatusCode.INVALID_ARGUMENT)
    assert client.forward("mlp", fitting).outputs.shape == (1, 4)


@pytest.mark.parametrize("args, kwargs, match", [
    ((np.ones((2, 4), np.float32),), {}, r"argument 'x': expected shape \(\*, 3\), got \(2, 4\)"),
    ((np.ones((2, 3), np.float64),), {}, "argument 'x': expected dtype float32, got float64"),
    ((np.ones(3, np.float32),), {}, r"argument 'x': expected shape \(\*, 3\), got \(3,\)"),
    ((np.ones((2, 3), np.float32),), {"y": np.ones(3)}, r"argument 'y': expected shape \(2\)"),
    ((2.0,), {}, "argument 'x': expected a tensor float32"),
])
def test_declared_specs_name_the_argument(env, args, kwargs, match) -> None:
    _, client = env
    with pytest.raises(gradserve.InvalidArgument, match=match):
        client.forward("spec", args, kwargs)
    out = client.forward("spec", (np.ones((2, 3), np.float32),), {"y": np.ones(2, np.int64)})
    assert out.outputs == 6.0


def test_model_exception_is_internal_without_traceback(env) -> None:
    _, client = env
    with pytest.raises(gradserve.Internal) as info:
        client.forward("boom", (np.ones(4),))
    check(info, grpc.StatusCode.INTERNAL)
    assert info.value.message == "endpoint 'boom' raised ValueError: bad value 4"
    assert "Traceback" not in str(info.value)


def test_debug_mode_adds_the_traceback(serve) -> None:
    _, client = serve({"boom": boom}, debug=True)
    with pytest.raises(gradserve.Internal, match="(?s)ValueError: bad value 1.*Traceback.*in boom"):
        client.forward("boom", (np.ones(1),))


def test_unsendable_output_is_internal_naming_it(env) -> None:
    _, client = env
    with pytest.raises(gradserve.Internal, match=r"outputs\['oops'\]: cannot send a builtins.object"):
        client.forward("object", (np.ones(1),))


def test_deadline_exceeded(env) -> None:
    _, client = env
    with pytest.raises(gradserve.DeadlineExceeded) as info:
        client.torch("slow", timeout=0.2)(torch.ones(1))
    check(info, grpc.StatusCode.DEADLINE_EXCEEDED)
    slow_client = gradserve.connect(client.address, timeout=0.2)
    with pytest.raises(gradserve.DeadlineExceeded):
        slow_client.forward("slow", (np.ones(1),))
    slow_client.close()


def test_request_over_size_limit_is_resource_exhausted(env) -> None:
    _, client = env
    assert client.transport == "shm"   # slots count against the limit like bytes do
    with pytest.raises(gradserve.ResourceExhausted, match="over the limit of 1048576") as info:
        client.forward("mlp", (np.ones((50_000, 6), np.float32),))
    check(info, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_message_over_grpc_limit_is_resource_exhausted(serve) -> None:
    _, client = serve({"mlp": mlp()}, max_message_bytes=64 << 10,
                      client_options={"chunk_bytes": 1 << 20, "transport": "grpc"})
    with pytest.raises(gradserve.ResourceExhausted):
        client.forward("mlp", (np.ones((20_000, 6), np.float32),))


def test_client_parameters_are_checked(env) -> None:
    _, client = env
    x = (np.ones((1, 6), np.float32),)
    with pytest.raises(gradserve.InvalidArgument,
                       match=r"parameters\['nope'\] is not a parameter of endpoint 'mlp'"):
        client.forward("mlp", x, parameters={"nope": np.ones(1, np.float32)})
    with pytest.raises(gradserve.InvalidArgument,
                       match=r"parameters\['0.weight'\]: expected float32\[16, 6\], got float32\[16, 5\]"):
        client.forward("mlp", x, parameters={"0.weight": np.ones((16, 5), np.float32)})
    with pytest.raises(gradserve.InvalidArgument, match="endpoint 'boom' takes no parameters"):
        client.forward("boom", x, parameters={})
    with pytest.raises(gradserve.InvalidArgument, match="parameters must be a dict"):
        client.forward("mlp", x, parameters=[np.ones(1, np.float32)])


def test_cotangent_mismatches_are_invalid(env) -> None:
    _, client = env
    res = client.forward("mlp", (np.ones((2, 6), np.float32),), need_vjp=True)
    with pytest.raises(gradserve.InvalidArgument,
                       match=r"cotangent for output tensor #0: expected float32\[2, 4\], got float32\[2, 5\]"):
        client.vjp(res.residual, np.ones((2, 5), np.float32))
    with pytest.raises(gradserve.InvalidArgument, match="must be a tensor or None, got list"):
        client.vjp(res.residual, [np.ones((2, 4), np.float32)] * 2)
    with pytest.raises(gradserve.InvalidArgument, match=r"cotangents: expected a dict with keys \['a'\]"):
        tree = client.forward("tree", ({"a": np.ones(2, np.float32)},), need_vjp=True)
        client.vjp(tree.residual, {"b": np.ones(2, np.float32)})
    # the residual survived the bad calls
    good = client.vjp(res.residual, np.ones((2, 4), np.float32))
    assert good.args[0].shape == (2, 6)
    assert client.describe("mlp").residuals.endpoint_count == 1
    assert client.release(res.residual, tree.residual) == 2


def raw_forward(stub, header, chunks=()):
    frames = [pb.ForwardFrame(header=header)] + [pb.ForwardFrame(chunk=c) for c in chunks]
    return list(stub.Forward(iter(frames), timeout=10))


def tensor_value(**fields):
    return pb.Value(tensor=pb.Tensor(**fields))


@pytest.mark.parametrize("tensor, match", [
    (dict(dtype=pb.FLOAT32, shape=[1, 6], data=bytes(20)), r"args\[0\]: payload has 20 bytes"),
    (dict(dtype=77, shape=[1, 6], data=bytes(24)), r"args\[0\]: unknown wire dtype 77"),
    (dict(dtype=pb.FLOAT32, shape=[1, -6], data=bytes(24)), r"args\[0\]: negative dimension"),
    (dict(dtype=pb.INT64, shape=[1, 6], data=bytes(48), requires_grad=True),
     r"args\[0\]: requires_grad on a int64 tensor"),
    (dict(dtype=pb.FLOAT32, shape=[1, 6]), r"args\[0\]: tensor has no payload"),
])
def test_malformed_payloads_are_invalid_argument(env, tensor, match) -> None:
    server, _ = env
    stub = raw(server)
    header = pb.ForwardRequest(endpoint="mlp", args=pb.Value(
        tuple_value=pb.Sequence(items=[tensor_value(**tensor)])))
    with pytest.raises(grpc.RpcError) as info:
        raw_forward(stub, header)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, info.value.details()), info.value.details()


def test_truncated_stream_is_invalid_argument(env) -> None:
    server, _ = env
    stub = raw(server)
    header = pb.ForwardRequest(endpoint="mlp", args=pb.Value(tuple_value=pb.Sequence(items=[
        tensor_value(dtype=pb.FLOAT32, shape=[100, 6], stream=pb.StreamedPayload(id=0))])))
    with pytest.raises(grpc.RpcError) as info:
        raw_forward(stub, header, [pb.Chunk(id=0, data=bytes(1000))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "args[0]: stream ended after 1000 of 2400 bytes" in info.value.details()


def test_vjp_on_unknown_residual_without_inputs_is_failed_precondition(env) -> None:
    server, _ = env
    stub = raw(server)
    request = pb.VjpRequest(endpoint="mlp", residual_id="made-up",
                            cotangents=pb.Value(none=pb.NoneValue()))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Vjp(iter([pb.VjpFrame(header=request)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("gradserve-reason", "residual-missing") in info.value.trailing_metadata()
    error = gradserve.errors.from_rpc_error(info.value)
    assert isinstance(error, gradserve.ResidualMissing)


def test_residual_of_another_endpoint_is_rejected(env) -> None:
    _, client = env
    res = client.forward("mlp", (np.ones((2, 6), np.float32),), need_vjp=True)
    res.residual.call.endpoint = "spec"
    with pytest.raises(gradserve.InvalidArgument, match="belongs to endpoint 'mlp', not 'spec'"):
        client.vjp(res.residual, np.ones((2, 4), np.float32))


def test_server_survives_bad_inputs(env) -> None:
    server, client = env
    for bad in (lambda: client.forward("boom", (np.ones(2),)),
                lambda: client.forward("mlp", ()),
                lambda: client.forward("nope", ())):
        with pytest.raises(gradserve.RemoteError):
            bad()
    x = torch.randn(3, 6, requires_grad=True)
    client.torch("mlp")(x).sum().backward()
    assert x.grad.shape == (3, 6)


def test_idle_request_streams_are_cancelled_and_the_server_keeps_serving(serve) -> None:
    import threading
    server, client = serve({"mlp": mlp()}, workers=2, idle_timeout=0.5)
    stub = raw(server)
    never = threading.Event()

    def stalled():
        yield pb.ForwardFrame(header=pb.ForwardRequest(endpoint="mlp"))
        never.wait(30)   # never half-closes

    calls = [stub.Forward(stalled(), timeout=30) for _ in range(2)]
    try:
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
        assert [e.name for e in client.endpoints(timeout=5)] == ["mlp"]
    finally:
        never.set()


def test_shape_only_tensors_count_against_the_limit_and_only_in_signature(env) -> None:
    server, client = env
    with pytest.raises(gradserve.ResourceExhausted, match="over the limit of 1048576"):
        client.signature("mlp", (TensorType((1 << 29,), "float32"),))
    stub = raw(server)
    header = pb.ForwardRequest(endpoint="mlp", args=pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(abstract=pb.TensorSpec(dtype=pb.FLOAT32, shape=[1, 6]))])))
    with pytest.raises(grpc.RpcError) as info:
        raw_forward(stub, header)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "args[0]: a shape-only tensor is allowed in Signature requests only" in info.value.details()


def test_empty_batch_of_cotangents_is_invalid(env) -> None:
    _, client = env
    res = client.forward("mlp", (np.ones((2, 6), np.float32),), need_vjp=True)
    with pytest.raises(gradserve.InvalidArgument, match="batch of at least one"):
        client.vjp(res.residual, np.ones((0, 2, 4), np.float32), batched=True)


def test_releases_survive_a_failed_flush(serve, faulty) -> None:
    server, _ = serve({"mlp": mlp()})
    client, channel = faulty(server.address)
    held = [client.forward("mlp", (np.ones((2, 6), np.float32),), need_vjp=True)
            for _ in range(2)]
    assert client.describe("mlp").residuals.count == 2
    del held                                  # queued for release with the next call
    assert client.pending_releases == 2
    channel.fail("Release", grpc.StatusCode.UNAVAILABLE)
    assert client.describe("mlp").residuals.count == 2   # the flush failed; Describe did not
    assert client.pending_releases == 2 and channel.calls["Release"] == 1
    assert client.describe("mlp").residuals.count == 0   # flushed with the next call
    assert client.pending_releases == 0 and channel.calls["Release"] == 2


def test_a_missing_residual_is_recomputed_once(serve, faulty) -> None:
    model = mlp()
    server, _ = serve({"mlp": model})
    client, channel = faulty(server.address)
    x = torch.randn(3, 6, requires_grad=True)
    ct = torch.randn(3, 4)
    y = client.torch("mlp")(x)
    channel.fail("Vjp", grpc.StatusCode.FAILED_PRECONDITION, "gone",
                 trailers=(("gradserve-reason", "residual-missing"),))
    y.backward(ct)
    assert channel.calls["Vjp"] == 2          # refused, then re-sent with the inputs
    xl = x.detach().clone().requires_grad_()
    model(xl).backward(ct)
    torch.testing.assert_close(x.grad, xl.grad, rtol=1e-6, atol=1e-6)


def test_a_session_the_server_lost_is_reopened_and_the_call_retried(serve, faulty) -> None:
    server, _ = serve({"mlp": mlp()})
    client, channel = faulty(server.address)
    first = client.session_info().id
    channel.fail("Forward", grpc.StatusCode.FAILED_PRECONDITION, "no such session",
                 trailers=(("gradserve-reason", "session-missing"),))
    out = client.forward("mlp", (np.ones((2, 6), np.float32),)).outputs
    assert out.shape == (2, 4)
    assert channel.calls["Forward"] == 2 and channel.calls["OpenSession"] == 2
    assert client.session_info().id != first and client.transport == "shm"
