"""Dynamic batching across clients: merged runs give each caller exactly its unbatched
results and gradients, a bad caller fails alone, and what batching did is reported."""

from __future__ import annotations

import gc
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

import gradserve
from gradserve.server import Server
from gradserve.wire.specs import BatchStats, TensorSpec
from helpers import scrape, series, wait_until

pytestmark = pytest.mark.timeout(120) if hasattr(pytest.mark, "timeout") else []


def mlp(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).to(dtype)


@pytest.fixture
def batching() -> Iterator[Callable[..., Server]]:
    """``batching(name=fn, ..., max_batch=.., max_delay=.., **add_options)`` -> a started
    server hosting each ``fn`` as a batchable torch endpoint."""
    servers: list[Server] = []

    def start(endpoints: dict[str, Any], *, batchable: bool = True, **options: Any) -> Server:
        server = Server("127.0.0.1", 0)
        for name, fn in endpoints.items():
            if isinstance(fn, gradserve.server.Endpoint):
                server.add(name, fn, **options)
            else:
                server.add_torch(name, fn, batchable=batchable, **options)
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


def together(address: str, calls: Sequence[Callable[[gradserve.Client], Any]],
             **client_options: Any) -> list[Any]:
    """Run each call in its own thread with its own client, all starting at once; their
    results (or the exceptions they raised), in order."""
    clients = [gradserve.connect(address, transport="grpc", **client_options) for _ in calls]
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i](clients[i])
        except Exception as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    return results


def crowd(address: str, name: str, *args: np.ndarray) -> BatchStats:
    """Calls at once until two of them met in the batcher, so the endpoint's calls wait for
    others from now on (a lone client's never do); the endpoint's batch statistics after.
    (Clients in one process share a connection: only calls that overlap make a crowd.)"""
    found = stats(address, name)
    for _ in range(20):
        together(address, [lambda c: c.forward(name, args), lambda c: c.forward(name, args)])
        before, found = found, stats(address, name)
        runs, calls = since(before, found)[:2]
        if runs < calls:   # two of them ran as one
            return found
    raise AssertionError("two calls at once never met in the batcher")


def stats(address: str, name: str) -> BatchStats:
    with gradserve.connect(address) as client:
        found = client.describe(name).batches
    assert found is not None
    return found


def since(before: BatchStats, after: BatchStats) -> tuple[int, ...]:
    """(forward runs, forward calls, forward rows, vjp runs, vjp calls) from one to the other."""
    fields = ("forward_runs", "forward_calls", "forward_rows", "vjp_runs", "vjp_calls")
    return tuple(getattr(after, f) - getattr(before, f) for f in fields)


def local_grads(model: torch.nn.Module, x: np.ndarray, ct: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    xt = torch.tensor(x, requires_grad=True)
    y = model(xt)
    y.backward(torch.tensor(ct))
    return y.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_merged_calls_give_each_caller_its_unbatched_values_and_gradients(batching, dtype, tol
                                                                          ) -> None:
    model = mlp(dtype)
    rows = [1, 3, 5, 7]                                   # 16 rows: one merged run
    server = batching({"mlp": model}, max_batch=sum(rows), max_delay=1.0)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 6)).astype(np_dtype) for n in rows]
    cts = [rng.standard_normal((n, 3)).astype(np_dtype) for n in rows]
    gate = threading.Barrier(len(rows) - 1)
    before = crowd(server.address, "mlp", xs[0])

    def caller(i: int) -> Callable[[gradserve.Client], Any]:
        def call(client: gradserve.Client) -> Any:
            result = client.forward("mlp", (xs[i],), need_vjp=True)
            if i == 0:                                    # never sends its Vjp
                return result.outputs, None
            if i == 1:                                    # its residual was evicted
                server.residuals.release([result.residual.id])
            gate.wait()
            (grad,) = client.vjp(result.residual, cts[i]).args
            return result.outputs, grad
        return call

    results = together(server.address, [caller(i) for i in range(len(rows))])
    for i, (outputs, grad) in enumerate(results):
        y, g = local_grads(model, xs[i], cts[i])
        np.testing.assert_allclose(outputs, y, rtol=tol, atol=tol)
        if grad is not None:
            np.testing.assert_allclose(grad, g, rtol=tol, atol=tol)
    after = stats(server.address, "mlp")
    # one merged forward; callers 2 and 3 backpropagate together over the merged graph,
    # caller 1 recomputes from its re-sent inputs
    assert since(before, after) == (1, 4, 16, 1, 2)
    assert after.max_calls == 4


def test_calls_with_their_own_parameters_run_alone(batching) -> None:
    model = mlp(torch.float32)
    server = batching({"mlp": model}, max_batch=8, max_delay=1.0)
    own = {k: v.detach().numpy() * 1.5 for k, v in model.named_parameters()}
    x = np.ones((4, 6), np.float32)
    before = crowd(server.address, "mlp", x)

    def with_params(client: gradserve.Client) -> Any:
        return client.forward("mlp", (x,), parameters=own).outputs

    def plain(client: gradserve.Client) -> Any:
        return client.forward("mlp", (x,)).outputs

    with_own, without = together(server.address, [with_params, plain])
    scaled = mlp(torch.float32)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(1.5)
        np.testing.assert_allclose(with_own, scaled(torch.tensor(x)).numpy(), rtol=1e-6)
        np.testing.assert_allclose(without, model(torch.tensor(x)).numpy(), rtol=1e-6)
    # the call with parameters ran alone
    assert since(before, stats(server.address, "mlp"))[:2] == (1, 1)


def test_a_bad_call_fails_alone_and_never_the_batch(batching) -> None:
    def guarded(x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            raise ValueError("nan in the input")
        return x * 2

    server = batching({"f": guarded}, max_batch=9, max_delay=1.0,
                      inputs={"x": TensorSpec((None, 4), "float32")})
    good = [np.full((3, 4), float(i), np.float32) for i in range(3)]
    nan = np.full((2, 4), np.nan, np.float32)
    before = crowd(server.address, "f", good[0])
    calls = [lambda c, x=x: c.forward("f", (x,)).outputs for x in good]
    calls.append(lambda c: c.forward("f", (np.ones((2, 5), np.float32),)).outputs)
    results = together(server.address, calls)
    for x, out in zip(good, results[:3]):
        np.testing.assert_array_equal(out, x * 2)
    assert isinstance(results[3], gradserve.InvalidArgument)
    assert "argument 'x': expected shape (*, 4), got (2, 5)" in str(results[3])
    assert since(before, stats(server.address, "f"))[:3] == (1, 3, 9)

    # a call that makes the model raise: the merged run is retried call by call
    calls = [lambda c, x=x: c.forward("f", (x,)).outputs for x in good]
    calls.append(lambda c: c.forward("f", (nan,)).outputs)
    server.registry.get("f").max_batch = 11
    results = together(server.address, calls)
    for x, out in zip(good, results[:3]):
        np.testing.assert_array_equal(out, x * 2)
    assert isinstance(results[3], gradserve.RemoteError)
    assert results[3].code.name == "INTERNAL"
    assert "endpoint 'f' raised ValueError: nan in the input" in str(results[3])


def test_a_lone_caller_does_not_wait_for_others(batching) -> None:
    server = batching({"double": lambda x: x * 2}, max_batch=64, max_delay=30.0)
    with gradserve.connect(server.address, transport="grpc") as client:
        for _ in range(3):
            out = client.forward("double", (np.ones((2, 3), np.float32),)).outputs
            np.testing.assert_array_equal(out, np.full((2, 3), 2.0))
    found = stats(server.address, "double")
    assert found.forward_runs == 3
    assert found.queue_seconds < 3.0        # not the 30 s max_delay, three times over


def test_max_delay_bounds_the_wait_of_a_caller_left_alone_in_a_crowd(batching) -> None:
    server = batching({"double": lambda x: x * 2}, max_batch=64, max_delay=0.3)
    x = np.ones((2, 3), np.float32)
    before = crowd(server.address, "double", x)   # two connections: calls now wait
    with gradserve.connect(server.address, transport="grpc") as client:
        np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
    after = stats(server.address, "double")
    assert since(before, after)[:2] == (1, 1)
    waited = after.queue_seconds - before.queue_seconds
    assert 0.25 <= waited < 0.3 + 5.0        # it waited for company, max_delay and no longer


def test_non_batchable_endpoints_and_max_batch_zero_never_merge(batching) -> None:
    server = batching({"plain": lambda x: x + 1}, batchable=False, max_batch=64,
                      max_delay=1.0)
    off = batching({"off": lambda x: x + 1}, max_batch=0)
    for srv, name in ((server, "plain"), (off, "off")):
        endpoint = srv.registry.get(name)
        runs: list[int] = []
        original = endpoint.run_forward
        endpoint.run_forward = lambda inputs, need_vjp: (  # type: ignore[method-assign]
            runs.append(1), original(inputs, need_vjp))[1]
        calls = [lambda c, i=i: c.forward(name, (np.full((2, 2), float(i), np.float32),)).outputs
                 for i in range(4)]
        results = together(srv.address, calls)
        for i, out in enumerate(results):
            np.testing.assert_array_equal(out, np.full((2, 2), i + 1.0))
        assert len(runs) == 4
        with gradserve.connect(srv.address) as client:
            info = client.describe(name)
        assert info.batches is None and info.max_batch == 0


def test_batched_cotangents_and_releases_keep_exact_gradients(batching) -> None:
    model = mlp(torch.float64)
    rows = [2, 2, 4]
    server = batching({"mlp": model}, max_batch=8, max_delay=1.0)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 6)) for n in rows]
    done = threading.Barrier(len(rows))
    before = crowd(server.address, "mlp", xs[0])

    def caller(i: int) -> Callable[[gradserve.Client], Any]:
        def call(client: gradserve.Client) -> Any:
            result = client.forward("mlp", (xs[i],), need_vjp=True)
            if i > 0:   # the others let their residuals go: the merged graph goes too
                client.release(result.residual)
                done.wait()
                return None
            done.wait()
            eye = np.eye(rows[i] * 3).reshape(rows[i] * 3, rows[i], 3)
            (jac,) = client.vjp(result.residual, eye, batched=True).args
            return jac
        return call

    jac = together(server.address, [caller(i) for i in range(len(rows))])[0]
    local = torch.autograd.functional.jacobian(model, torch.tensor(xs[0])).numpy()
    np.testing.assert_allclose(jac.reshape(local.shape), local, rtol=1e-12, atol=1e-12)
    assert since(before, stats(server.address, "mlp"))[:2] == (1, 3)


def test_jax_endpoints_batch_too(batching) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10

    def f(x: Any) -> Any:
        return jnp.tanh(x @ w)

    endpoint = gradserve.server.JaxEndpoint(f, batchable=True)
    server = batching({"f": endpoint}, max_batch=8, max_delay=1.0)
    xs = [np.full((n, 4), 0.1 * n, np.float32) for n in (1, 2, 3)]
    cts = [np.ones((n, 3), np.float32) for n in (1, 2, 3)]
    before = crowd(server.address, "f", xs[0])

    def caller(i: int) -> Callable[[gradserve.Client], Any]:
        def call(client: gradserve.Client) -> Any:
            result = client.forward("f", (xs[i],), need_vjp=True)
            return result.outputs, client.vjp(result.residual, cts[i]).args[0]
        return call

    results = together(server.address, [caller(i) for i in range(3)])
    for x, ct, (out, grad) in zip(xs, cts, results):
        y, pull = jax.vjp(f, x)
        np.testing.assert_allclose(out, y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grad, pull(ct)[0], rtol=1e-6, atol=1e-6)
    assert since(before, stats(server.address, "f")) == (1, 3, 6, 1, 3)
    # merged runs are padded to a power of two rows: 1+2+4 rows runs as 8, like 1+2+3 did,
    # and compiles nothing new
    compiled = endpoint.compiles
    xs = [np.full((n, 4), 0.1 * n, np.float32) for n in (1, 2, 4)]
    cts = [np.ones((n, 3), np.float32) for n in (1, 2, 4)]
    results = together(server.address, [caller(i) for i in range(3)])
    for x, ct, (out, grad) in zip(xs, cts, results):
        y, pull = jax.vjp(f, x)
        np.testing.assert_allclose(out, y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grad, pull(ct)[0], rtol=1e-6, atol=1e-6)
    assert endpoint.compiles == compiled


def test_settings_are_checked_and_described(batching) -> None:
    server = batching({"double": lambda x: x * 2}, max_batch=32, max_delay=0.004)
    with gradserve.connect(server.address) as client:
        info = client.describe("double")
    assert (info.batchable, info.max_batch, info.max_delay) == (True, 32, 0.004)
    with pytest.raises(ValueError, match="max_batch must be at least 0, got -1"):
        server.add_torch("bad", lambda x: x, batchable=True, max_batch=-1)
    for delay in (-0.001, 61.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"max_delay must be 0 to 60 seconds, got {delay}"):
            server.add_torch("bad", lambda x: x, batchable=True, max_delay=delay)
    with gradserve.connect(server.address) as client:
        assert [e.name for e in client.endpoints()] == ["double"]   # none of them was added


@pytest.mark.parametrize("over", [False, True])
def test_one_message_and_streaming_calls_agree_at_the_threshold(serve, faulty, over) -> None:
    """A request that fits in one message goes as ForwardUnary/VjpUnary, a larger one
    streams; both give the local results."""
    server, _ = serve({"mlp": mlp(torch.float32)}, client_options={"transport": "grpc"})
    chunk = 64 << 10
    rows = chunk // (6 * 4) + (1 if over else -1)      # just over / under one message
    client, channel = faulty(server.address, transport="grpc", chunk_bytes=chunk)
    x = np.random.default_rng(2).standard_normal((rows, 6)).astype(np.float32)
    ct = np.ones((rows, 3), np.float32)
    result = client.forward("mlp", (x,), need_vjp=True)
    (grad,) = client.vjp(result.residual, ct).args
    y, g = local_grads(mlp(torch.float32), x, ct)
    np.testing.assert_allclose(result.outputs, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, g, rtol=1e-6, atol=1e-6)
    # the cotangents always fit in one message; the gradients come back in one, however
    # large, and a reply over one chunk makes the next such call stream
    assert channel.rpcs["Forward" if over else "ForwardUnary"] == 1
    assert (channel.rpcs["ForwardUnary" if over else "Forward"], channel.rpcs["VjpUnary"],
            channel.rpcs["Vjp"]) == (0, 1, 0)
    (again,) = client.vjp(result.residual, ct).args
    np.testing.assert_array_equal(again, grad)
    assert (channel.rpcs["VjpUnary"], channel.rpcs["Vjp"]) == ((1, 1) if over else (2, 0))


class _PickyBackward(torch.autograd.Function):
    """x * 2, whose backward refuses a cotangent holding NaN."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if torch.isnan(grad).any():
            raise ValueError("nan in the cotangent")
        return grad * 2


def test_a_backward_that_fails_for_one_caller_fails_only_that_caller(batching) -> None:
    server = batching({"picky": _PickyBackward.apply}, max_batch=6, max_delay=1.0)
    xs = [np.full((2, 3), float(i), np.float32) for i in range(3)]
    cts = [np.ones((2, 3), np.float32), np.full((2, 3), np.nan, np.float32),
           np.full((2, 3), 3.0, np.float32)]
    before = crowd(server.address, "picky", xs[0])
    both = threading.Barrier(3)

    def caller(i: int) -> Callable[[gradserve.Client], Any]:
        def call(client: gradserve.Client) -> Any:
            result = client.forward("picky", (xs[i],), need_vjp=True)
            both.wait()
            return client.vjp(result.residual, cts[i]).args[0]
        return call

    first, bad, third = together(server.address, [caller(i) for i in range(3)])
    np.testing.assert_array_equal(first, np.full((2, 3), 2.0))
    np.testing.assert_array_equal(third, np.full((2, 3), 6.0))
    assert isinstance(bad, gradserve.RemoteError) and bad.code.name == "INTERNAL"
    assert "nan in the cotangent" in str(bad)
    # one merged forward; one merged backward for the three, which failed, then each alone:
    # three backward runs served them
    assert since(before, stats(server.address, "picky")) == (1, 3, 6, 3, 3)


def test_one_message_calls_keep_the_request_limits(serve) -> None:
    import grpc

    from gradserve.v1 import gradserve_pb2 as pb
    from helpers import raw

    server, _ = serve({"double": lambda x: x * 2}, max_request_values=50,
                      max_request_bytes=1 << 16)
    stub = raw(server)

    def call(*leaves: pb.Value) -> grpc.RpcError:
        request = pb.ForwardRequest(endpoint="double")
        request.args.tuple_value.items.extend(leaves)
        with pytest.raises(grpc.RpcError) as info:
            stub.ForwardUnary(request)
        return info.value

    streamed = pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[4],
                                         stream=pb.StreamedPayload(id=0)))
    err = call(streamed)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "args[0]: a one-message call carries its tensors inline or in slots" in err.details()
    err = call(*[pb.Value(int_value=i) for i in range(60)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 50 pytree nodes" in err.details()
    big = pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 15], data=bytes(1 << 17)))
    err = call(big)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "message carries 131072 tensor bytes, over the limit of 65536" in err.details()
    reply = stub.ForwardUnary(pb.ForwardRequest(endpoint="double", args=pb.Value(
        tuple_value=pb.Sequence(items=[pb.Value(tensor=pb.Tensor(
            dtype=pb.FLOAT32, shape=[2], data=np.array([1, 2], np.float32).tobytes()))]))))
    assert np.frombuffer(reply.outputs.tensor.data, np.float32).tolist() == [2.0, 4.0]


def test_a_large_reply_to_a_one_message_call_is_sent_again_streaming(serve, faulty) -> None:
    """The server refuses to put more than four chunks in one message; the client sends the
    call again on the stream and streams that endpoint's calls from then on."""
    def wide(x: torch.Tensor) -> torch.Tensor:
        return torch.ones(1 << 21) * x.sum()           # 8 MiB out of an 8-byte input

    server, _ = serve({"wide": wide})
    client, channel = faulty(server.address, transport="grpc")
    x = np.ones(2, np.float32)
    for _ in range(2):
        result = client.forward("wide", (x,), need_vjp=True)
        np.testing.assert_array_equal(result.outputs[:4], np.full(4, 2.0, np.float32))
        assert result.outputs.shape == (1 << 21,)
    assert (channel.rpcs["ForwardUnary"], channel.rpcs["Forward"]) == (1, 2)
    assert server.residuals.stats().count == 2          # the refused attempt kept none
    assert client.vjp(result.residual, np.ones(1 << 21, np.float32)).args[0].tolist() == [
        float(1 << 21)] * 2


def test_batched_cotangents_that_are_all_none_give_no_gradient(batching) -> None:
    server = batching({"double": lambda x: x * 2}, max_batch=4, max_delay=1.0)
    x = np.ones((2, 3), np.float32)
    crowd(server.address, "double", x)

    def caller(client: gradserve.Client) -> Any:
        result = client.forward("double", (x,), need_vjp=True)
        return client.vjp(result.residual, None, batched=True).args

    for grads in together(server.address, [caller, caller]):
        assert grads == (None,)


def test_jax_padding_never_goes_past_max_batch(batching) -> None:
    pytest.importorskip("jax")

    def f(x: Any) -> Any:
        return x * 2

    endpoint = gradserve.server.JaxEndpoint(f, batchable=True)
    server = batching({"f": endpoint}, max_batch=6, max_delay=1.0)
    ran: list[int] = []
    original = endpoint.run_forward
    endpoint.run_forward = lambda inputs, need_vjp: (  # type: ignore[method-assign]
        ran.append(endpoint.leaf_type(inputs.args[0]).shape[0]), original(inputs, need_vjp))[1]
    xs = [np.full((n, 2), float(n), np.float32) for n in (1, 2, 3)]
    crowd(server.address, "f", xs[0])
    ran.clear()
    results = together(server.address, [lambda c, x=x: c.forward("f", (x,)).outputs for x in xs])
    for x, out in zip(xs, results):
        np.testing.assert_array_equal(out, 2 * x)
    assert ran == [6]                    # 1+2+3 rows: not padded to 8, past max_batch


def test_vjps_giving_cotangents_for_other_outputs_each_get_their_unbatched_nones(batching
                                                                                ) -> None:
    server = batching({"f": lambda x, z: (x * 2, z * 3)}, max_batch=4, max_delay=1.0)
    x = np.ones((2, 3))
    before = crowd(server.address, "f", x, x)
    gate = threading.Barrier(2)

    def caller(cotangents: tuple[Any, Any]) -> Callable[[gradserve.Client], Any]:
        def call(client: gradserve.Client) -> Any:
            result = client.forward("f", (x, x), need_vjp=True)
            gate.wait()
            return client.vjp(result.residual, cotangents).args
        return call

    ones = np.ones((2, 3))
    first, second = together(server.address, [caller((ones, None)), caller((None, ones))])
    assert first[1] is None and second[0] is None   # alone, no cotangent reaches them
    np.testing.assert_array_equal(first[0], 2 * ones)
    np.testing.assert_array_equal(second[1], 3 * ones)
    # one merged forward; the two Vjps backpropagate separately over its graph
    assert since(before, stats(server.address, "f")) == (1, 2, 4, 2, 2)


def test_a_double_backward_through_a_batchable_endpoint_frees_its_share(batching) -> None:
    """Every Forward of a batchable endpoint keeps a share of a run (a lone call's too);
    a kept Vjp recomputes from the share's inputs, and the share stays the client's."""
    server = batching({"cube": lambda x: x ** 3}, max_batch=8, max_delay=1.0)
    with gradserve.connect(server.address, transport="grpc") as client:
        cube = client.torch("cube")
        x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(cube(x).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
        torch.testing.assert_close(g, 3 * x.detach() ** 2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, 6 * x.detach(), rtol=1e-12, atol=1e-12)
        assert server.residuals.stats().count == 2   # the share, and g's graph for h
        # the share stayed the client's: released once the graph holding it is gone
        del g, h
        gc.collect()
        client.forward("cube", (np.ones((1, 2)),))   # carries the queued releases
        assert server.residuals.stats().count == 0


@pytest.mark.parametrize("batchable", [False, True])
def test_a_caller_that_gives_up_while_its_forward_runs_leaves_no_residual(batchable) -> None:
    running, finish = threading.Event(), threading.Event()

    def slow(x: torch.Tensor) -> torch.Tensor:
        running.set()
        finish.wait(30)
        return x * 2

    server = Server("127.0.0.1", 0, metrics_port=0)
    server.add_torch("slow", slow, batchable=batchable)
    server.start()
    try:
        with gradserve.connect(server.address, transport="grpc") as client:
            with pytest.raises(gradserve.errors.DeadlineExceeded):
                client.forward("slow", (np.ones((2, 3)),), need_vjp=True, timeout=0.5)
            assert running.is_set()
            finish.set()
            method = series("gradserve_inflight_calls", method="ForwardUnary")
            wait_until(lambda: scrape(server.metrics_port)[method] == 0,
                       message="the call never ended on the server")
            assert client.describe("slow").residuals.count == 0
    finally:
        finish.set()
        server.stop(grace=0)


def test_a_leader_that_fails_while_waiting_fails_its_whole_group(batching) -> None:
    server = batching({"double": lambda x: x * 2}, max_batch=8, max_delay=1.0)
    x = np.ones((2, 3), np.float32)
    crowd(server.address, "double", x)
    endpoint = server.registry.get("double")
    endpoint.max_delay = float("inf")   # past what a wait takes: the leader's wait raises

    def caller(client: gradserve.Client) -> Any:
        return client.forward("double", (x,), timeout=20)

    # the follower ends with the leader's error, not at its deadline; nothing stays open
    for found in together(server.address, [caller, caller]) + together(server.address,
                                                                       [caller]):
        assert isinstance(found, gradserve.RemoteError) and found.code.name == "INTERNAL"
        assert "OverflowError" in str(found)
    endpoint.max_delay = 0.0
    np.testing.assert_array_equal(together(server.address, [caller])[0].outputs, x * 2)
