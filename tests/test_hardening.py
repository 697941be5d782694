"""Careless or hostile clients: what they send is bounded, what they leave is reclaimed,
and a legitimate call still goes through (real sockets on loopback, small limits)."""

from __future__ import annotations

import logging
import re
import threading
import time

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.client.transports import shm
from gradserve.errors import StatusError
from gradserve.server import Server
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from helpers import ask_shm, needs_shm, raw, resident_bytes, shm_names, wait_until
from models import local_input_grad, mlp

#: what a client sees calling a server that is down (gRPC's words, then the OS's)
UNREACHABLE = r"UNAVAILABLE: failed to connect to all addresses.*Connection refused"
#: what every test here serves as "mlp" (``mlp()`` is seeded: each copy is the same model)
REFERENCE = mlp()


def legitimate_call_works(client: gradserve.Client) -> None:
    """A normal forward+backward of "mlp" still succeeds, with the right gradient, and
    promptly: the attacks here would hold it up for a minute."""
    start = time.monotonic()
    x = torch.randn(3, 6, requires_grad=True)
    client.torch("mlp")(x).sum().backward()
    assert time.monotonic() - start < 10.0
    torch.testing.assert_close(x.grad, local_input_grad(REFERENCE, x, torch.ones(3, 4)),
                               rtol=1e-6, atol=1e-6)


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
    runs: list[int] = []

    def count(xs):
        runs.append(len(xs))
        return len(xs)

    server, client = serve({"mlp": mlp(), "count": count}, client_options={"transport": "grpc"},
                           max_request_values=1000, max_request_bytes=1 << 20)
    with pytest.raises(gradserve.ResourceExhausted,
                       match="more than 1000 pytree nodes, this server's limit"):
        client.forward("count", ([0] * 5000,))
    # the nodes are counted before anything else is looked at: a request that also declares
    # a tensor over max_request_bytes and holds a value of no kind is refused for its nodes
    header = pb.ForwardRequest(endpoint="count", args=pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(list_value=pb.Sequence(items=[pb.Value(int_value=1)] * 5000 + [pb.Value()])),
        pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 30],
                                  stream=pb.StreamedPayload(id=0)))])))
    with pytest.raises(grpc.RpcError) as info:
        list(raw(server).Forward(iter([pb.ForwardFrame(header=header)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 1000 pytree nodes, this server's limit" in info.value.details()
    assert runs == []                                  # the endpoint never ran
    assert client.forward("count", ([0] * 900,)).outputs == 900
    assert runs == [900]
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
    time.sleep(0.5)                                # let them reach the server (nothing to poll)
    start = time.monotonic()
    server.stop(grace=0.5)
    # the promise is grace + STOP_SECONDS; slack for a busy machine, far below the calls' 30 s
    assert time.monotonic() - start < 0.5 + 0.5 + 3.0
    never.set()
    for call in calls:
        call.cancel()
    channel.close()


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


# -- same-host sessions -----------------------------------------------------------------
def probe_proofs(opened: pb.OpenSessionResponse) -> list[pb.RegionProof]:
    """What a client that maps the probes sends back."""
    proofs = []
    for region in opened.regions:
        mapped = shm.open_region(region.handle.decode(), region.nbytes)
        proofs.append(pb.RegionProof(region=region.index, nonce=bytes(mapped[:32])))
        mapped.close()
    return proofs


@needs_shm
def test_an_unproved_session_holds_a_page_and_goes_within_seconds(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           session_proof_seconds=0.5, max_sessions_per_peer=32)
    stub = raw(server)
    opened = [stub.OpenSession(ask_shm(1 << 30)) for _ in range(20)]   # 20 x 2 GiB asked for
    assert server.sessions.budget.used(pb.SHARED_MEMORY) == 20 * 4096   # 20 probes, no more
    assert len(shm_names(server)) == 20
    assert not stub.KeepAlive(pb.SessionRequest(session_id=opened[0].session_id)).open
    legitimate_call_works(client)
    wait_until(lambda: server.sessions.count() == 0)
    assert not shm_names(server)
    assert server.sessions.budget.used(pb.SHARED_MEMORY) == 0


def confirmed(stub: pb_grpc.GradserveStub) -> str:
    """A session opened and proved the way a client does, with its regions confirmed."""
    opened = stub.OpenSession(ask_shm())
    proved = stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=opened.session_id,
                                                          proofs=probe_proofs(opened)))
    stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=opened.session_id,
                                                 proofs=probe_proofs(proved)))
    return opened.session_id


def connection(server: Server) -> pb_grpc.GradserveStub:
    """A stub on a connection of its own."""
    return pb_grpc.GradserveStub(grpc.insecure_channel(
        server.address, options=[("grpc.use_local_subchannel_pool", 1)]))


@needs_shm
def test_sessions_are_bounded_per_connection_and_per_server(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           max_sessions=3, max_sessions_per_peer=2)
    stub = connection(server)
    confirmed(stub)
    confirmed(stub)
    with pytest.raises(grpc.RpcError) as info:
        stub.OpenSession(ask_shm())
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this connection (or token) holds 2 same-host sessions" in info.value.details()
    other = connection(server)
    confirmed(other)
    with pytest.raises(grpc.RpcError) as info:
        connection(server).OpenSession(ask_shm())
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this server holds 3 same-host sessions, its limit" in info.value.details()
    legitimate_call_works(client)


@needs_shm
def test_unproved_sessions_cannot_lock_out_a_real_client(serve) -> None:
    server, _ = serve({"mlp": mlp()}, client_options={"transport": "grpc"}, max_sessions=8,
                      max_sessions_per_peer=100)
    stub = connection(server)
    openers = [stub.OpenSession(ask_shm()) for _ in range(30)]     # never proved
    assert server.sessions.count() == 2                          # a quarter of the table
    for gone in (openers[0], openers[27]):                       # the oldest gave way
        with pytest.raises(StatusError) as info:
            server.sessions.info(gone.session_id)
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                        "session-missing")
        with pytest.raises(grpc.RpcError) as rpc:
            stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=gone.session_id, proofs=[
                pb.RegionProof(region=r.index, nonce=b"x" * 32) for r in gone.regions]))
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("gradserve-reason", "session-missing") in rpc.value.trailing_metadata()
    for kept in openers[28:]:                                     # the newest are still there
        assert server.sessions.info(kept.session_id).id == kept.session_id
    stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=openers[29].session_id,
                                                 proofs=probe_proofs(openers[29])))
    with gradserve.connect(server.address) as client:
        assert client.transport == "shm"
        legitimate_call_works(client)


@needs_shm
def test_all_sessions_together_stay_within_the_shared_memory_budget(serve) -> None:
    server, _ = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                      max_shm_total_bytes=6 << 20)
    first = gradserve.connect(server.address, arena_bytes=2 << 20)
    second = gradserve.connect(server.address, arena_bytes=2 << 20)
    try:
        assert first.transport == "shm" and second.transport == "grpc"
        assert "shared-memory budget is spent" in second.fallback_reason
        assert server.sessions.budget.used(pb.SHARED_MEMORY) == 4 << 20
        legitimate_call_works(first)
        legitimate_call_works(second)
    finally:
        first.close()
        second.close()
    wait_until(lambda: server.sessions.budget.used(pb.SHARED_MEMORY) == 0, timeout=5)


@needs_shm
def test_duplicate_confirmations_race_cleanly(serve) -> None:
    server, _ = serve({"mlp": mlp()}, client_options={"transport": "grpc"})
    stub = raw(server)
    for _ in range(5):
        opened = stub.OpenSession(ask_shm())
        request = pb.ConfirmSessionRequest(session_id=opened.session_id,
                                           proofs=probe_proofs(opened))
        codes: list[grpc.StatusCode] = []
        barrier = threading.Barrier(6)

        def confirm() -> None:
            barrier.wait()
            try:
                stub.ConfirmSession(request)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())

        threads = [threading.Thread(target=confirm) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes, key=str).count(grpc.StatusCode.OK) == 1
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
        stub.CloseSession(pb.SessionRequest(session_id=opened.session_id))
    assert not shm_names(server)


@needs_shm
def test_regions_of_dead_servers_are_removed_at_start_and_live_ones_kept() -> None:
    import fcntl
    import os

    dead, orphan = "d" * 16, "e" * 16
    stale = [f"gradserve-{dead}-{'a' * 32}-req", f"gradserve-{dead}-{'b' * 32}-probe",
             f"gradserve-{orphan}-{'c' * 32}-rep"]
    for name in stale + [f"gradserve-{dead}.lock"]:     # a lock file nobody holds
        with open(os.path.join(shm.SHM_DIR, name), "wb") as f:
            f.write(b"x")
    live = Server("127.0.0.1", 0)
    live.start()
    try:
        assert not set(stale) & set(os.listdir(shm.SHM_DIR))
        opened = raw(live).OpenSession(ask_shm())            # live: a probe under its name
        (probe,) = [r.handle.decode() for r in opened.regions]
        lock = f"gradserve-{probe.split('-')[1]}.lock"
        with open(os.path.join(shm.SHM_DIR, lock), "rb") as f:
            with pytest.raises(BlockingIOError):        # its server holds the lock
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        other = Server("127.0.0.1", 0)
        other.start()                                    # sweeps, but keeps the live server's
        other.stop(grace=0)
        assert probe in os.listdir(shm.SHM_DIR)
    finally:
        live.stop(grace=0)
    assert probe not in os.listdir(shm.SHM_DIR) and lock not in os.listdir(shm.SHM_DIR)


def test_a_backward_in_flight_across_a_restart_is_re_sent(faulty) -> None:
    model = mlp()
    first = Server("127.0.0.1", 0)
    first.add_torch("mlp", model)
    first.start()
    port = first.port
    client, channel = faulty(first.address, transport="grpc", timeout=20)
    x = torch.randn(5, 6, requires_grad=True)
    ct = torch.randn(5, 4)
    y = client.torch("mlp")(x)                 # the forward ran on the first server
    first.stop(grace=0)                        # SIGTERM: its residuals are gone with it
    servers: list[Server] = []

    def come_back() -> None:
        time.sleep(0.8)                        # the server is down this long: the scenario
        second = Server("127.0.0.1", port)     # nothing listens on the port until now
        second.add_torch("mlp", model)
        second.start()
        servers.append(second)

    threading.Thread(target=come_back).start()
    y.backward(ct)                             # UNAVAILABLE, then re-sent to the new one
    assert channel.calls["Vjp"] >= 3           # refused at least twice before it landed
    torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-6, atol=1e-6)
    second = servers[0]
    y = client.torch("mlp", timeout=1.0)(x)
    second.stop(grace=0)                       # and nobody comes back: it gives up in time
    attempts = channel.calls["Vjp"]
    start = time.monotonic()
    with pytest.raises(gradserve.Unavailable, match=UNREACHABLE):
        y.sum().backward()
    assert channel.calls["Vjp"] - attempts >= 2   # it did try again within its 1 s deadline
    assert time.monotonic() - start < 8.0         # the deadline, not retry_seconds (30 s)


# -- streams that hold on ----------------------------------------------------------------
class Stalled:
    """Calls that send a header (and maybe a trickle) and then hold their stream open."""

    def __init__(self, address: str, trickle: float | None = None):
        self.address = address
        self.trickle = trickle
        self.done = threading.Event()
        self.calls: list = []
        self.channels: list = []

    def frames(self):
        header = pb.ForwardRequest(endpoint="mlp", args=pb.Value(tuple_value=pb.Sequence(items=[
            pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 18],
                                      stream=pb.StreamedPayload(id=0)))])))
        yield pb.ForwardFrame(header=header)
        while self.trickle is not None and not self.done.wait(self.trickle):
            yield pb.ForwardFrame(chunk=pb.Chunk(id=0, data=b"x"))
        self.done.wait(60)

    def open(self, count: int, separate: bool = False) -> list:
        """Start ``count`` calls (each on a connection of its own with ``separate``)."""
        for _ in range(count):
            options = [("grpc.use_local_subchannel_pool", 1)] if separate else []
            channel = grpc.insecure_channel(self.address, options=options)
            self.channels.append(channel)
            self.calls.append(pb_grpc.GradserveStub(channel).Forward(self.frames(), timeout=60))
        return self.calls[-count:]

    def close(self) -> None:
        self.done.set()
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


def healthy(port_address: str) -> bool:
    """A health check answers SERVING; the deadline is the bound (starved, it would wait as
    long as the stalled streams hold on: a minute)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(port_address))
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stalled_streams_starve_neither_calls_nor_health_checks(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"}, workers=2)
    attack = Stalled(server.address)
    try:
        attack.open(8)                              # four times the model's workers
        wait_until(lambda: server.service.active_streams() == 8, timeout=5)
        legitimate_call_works(client)
        assert healthy(server.address)
        assert server.service.active_streams() == 8    # all still open
    finally:
        attack.close()


def test_a_trickle_of_bytes_does_not_keep_a_stream_alive(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           idle_timeout=0.6, min_stream_rate=64 << 10)
    attack = Stalled(server.address, trickle=0.1)   # a byte every 0.1 s: never idle, too slow
    try:
        (call,) = attack.open(1)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - start < 10.0        # not the call's 60 s: cut off early
        legitimate_call_works(client)
    finally:
        attack.close()


def test_replies_nobody_reads_are_cancelled_and_their_threads_freed(serve) -> None:
    def big(x):
        return x.repeat(1 << 21)                    # 8 MiB out of 4 bytes in

    server, client = serve({"big": big, "mlp": mlp()}, client_options={"transport": "grpc"},
                           idle_timeout=0.5)
    channel = grpc.insecure_channel(server.address)
    header = pb.ForwardRequest(endpoint="big", args=pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=bytes(4)))])))
    calls = [pb_grpc.GradserveStub(channel).Forward(iter([pb.ForwardFrame(header=header)]),
                                                    timeout=60) for _ in range(4)]
    try:
        wait_until(lambda: server.service.active_streams() == 4, timeout=5)   # each blocked
        wait_until(lambda: server.service.active_streams() == 0, timeout=5)   # sending, unread
        legitimate_call_works(client)
    finally:
        for call in calls:
            call.cancel()
        channel.close()


def test_streams_per_connection_are_bounded(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           max_streams_per_peer=2)
    attack = Stalled(server.address)
    try:
        attack.open(2)
        wait_until(lambda: server.service.active_streams() == 2, timeout=5)   # these two first
        (third,) = attack.open(1)
        with pytest.raises(grpc.RpcError) as info:
            list(third)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this connection has 2 streaming calls open" in info.value.details()
        legitimate_call_works(client)                  # another connection
    finally:
        attack.close()


@pytest.mark.parametrize("method", ["ForwardUnary", "Describe", "GetParameters"])
def test_a_one_message_call_whose_request_never_comes_is_cancelled(serve, method) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           idle_timeout=0.5)
    channel = grpc.insecure_channel(server.address)
    never = threading.Event()

    def nothing():
        never.wait(60)
        yield b""

    calls = [channel.stream_stream(f"/gradserve.v1.Gradserve/{method}")(nothing(), timeout=60)
             for _ in range(3)]
    try:
        start = time.monotonic()
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - start < 10.0        # not the calls' 60 s: cut off early
        legitimate_call_works(client)
    finally:
        never.set()
        channel.close()


def test_open_calls_are_bounded_and_probes_answer_on_their_own_port(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           max_streams=3, health_port=0)
    attack = Stalled(server.address)
    try:
        attack.open(3, separate=True)
        wait_until(lambda: server.service.active_streams() == 3, timeout=5)
        with pytest.raises(gradserve.ResourceExhausted,
                           match="this server has 3 streaming calls open .*, its limit"):
            client.forward("mlp", (np.ones((1, 6), np.float32),))
        with pytest.raises(gradserve.ResourceExhausted,   # a reply stream too
                           match="this server has 3 streaming calls open .*, its limit"):
            client.parameters("mlp")
        assert healthy(f"127.0.0.1:{server.health_port}")
        # unary calls have room of their own beyond max_streams
        assert [e.name for e in client.endpoints()] == ["mlp"]
        assert client.describe("mlp").name == "mlp"
        assert server.service.active_streams() == 3
    finally:
        attack.close()
    wait_until(lambda: server.service.active_streams() == 0, timeout=5)
    legitimate_call_works(client)


def test_a_long_model_run_is_not_taken_for_a_stall(serve) -> None:
    def slow(x):
        time.sleep(1.2)
        return x * 2

    _, client = serve({"slow": slow}, client_options={"transport": "grpc"}, idle_timeout=0.4)
    np.testing.assert_array_equal(client.forward("slow", (np.ones(3),)).outputs, 2 * np.ones(3))


def test_parameters_nobody_reads_are_cancelled(serve, caplog) -> None:
    big = torch.nn.Linear(1024, 2048)                 # 8 MiB of parameters
    server, client = serve({"big": big, "mlp": mlp()}, client_options={"transport": "grpc"},
                           idle_timeout=0.5)
    channels = [grpc.insecure_channel(server.address,               # a connection each
                                      options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(3)]
    caplog.set_level(logging.WARNING, logger="gradserve.server")
    calls = [pb_grpc.GradserveStub(channel).GetParameters(
        pb.GetParametersRequest(endpoint="big"), timeout=60) for channel in channels]

    def cancelled() -> set[str]:
        """The connections the server says it cancelled a stream of (a call's status waits
        here until its replies are read)."""
        found = (re.match(r"cancelling a stream of (.+?): \d+ bytes", r.getMessage())
                 for r in caplog.records)
        return {m.group(1) for m in found if m}

    try:
        wait_until(lambda: len(cancelled()) == 3, timeout=10)
        for call in calls:                             # each was cancelled, not left to hang
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
        legitimate_call_works(client)
    finally:
        for channel in channels:
            channel.close()


@needs_shm
def test_a_residual_made_while_its_session_ended_goes_too(serve) -> None:
    entered, release = threading.Event(), threading.Event()

    def waits(x):
        entered.set()
        release.wait(10)
        return x * 2

    server, client = serve({"waits": waits})
    x = torch.ones(65536, requires_grad=True)         # 256 KiB: through a request slot
    result: list = []
    thread = threading.Thread(target=lambda: result.append(client.torch("waits")(x)))
    thread.start()
    entered.wait(10)
    server.sessions.close(client.session_info().id)   # ends while the forward runs
    release.set()
    thread.join(10)
    assert client.describe("waits").residuals.count == 0
    result[0].sum().backward()                        # recomputed
    assert torch.equal(x.grad, torch.full((65536,), 2.0))


@needs_shm
def test_growth_waits_for_a_spent_budget_rather_than_giving_up(serve, faulty) -> None:
    server, _ = serve({"double": lambda x: x * 2}, client_options={"transport": "grpc"},
                      max_shm_total_bytes=(2 << 20) + (4 << 20) + (1 << 20))
    client, channel = faulty(server.address, arena_bytes=1 << 20)
    hog = gradserve.connect(server.address, arena_bytes=2 << 20)   # takes 4 MiB of the 7
    big = np.ones(1 << 20, np.float32)           # 4 MiB: growing needs 8 MiB, not there
    np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)
    assert channel.calls["GrowSession"] == 1
    hog.close()
    wait_until(lambda: server.sessions.budget.used(pb.SHARED_MEMORY) == 2 << 20,   # the
               timeout=5)                                                   # client's own pair
    time.sleep(1.1)                                # past the retry interval: time is the point
    mid = np.ones(3 << 17, np.float32)             # 1.5 MiB: fits once the budget freed up
    np.testing.assert_array_equal(client.forward("double", (mid,)).outputs, 2 * mid)
    assert channel.calls["GrowSession"] == 2
    assert client.session_info().sizes("shared-memory", "request") == [1 << 20, 3 << 19]


@needs_shm
@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0,
                    reason="needs root to make another user's files")
def test_the_sweep_leaves_other_users_files_alone() -> None:
    import os

    theirs = [f"gradserve-{'f' * 16}-{'a' * 32}-req", f"gradserve-{'f' * 16}.lock"]
    for name in theirs:
        path = os.path.join(shm.SHM_DIR, name)
        with open(path, "wb") as f:
            f.write(b"x")
        os.chown(path, 12345, 12345)
    try:
        server = Server("127.0.0.1", 0)
        server.start()                                 # sweeps, and must not fail or touch them
        server.stop(grace=0)
        assert all(name in os.listdir(shm.SHM_DIR) for name in theirs)
    finally:
        for name in theirs:
            os.unlink(os.path.join(shm.SHM_DIR, name))


# -- limits the README promises ------------------------------------------------------------
class Gate:
    """An endpoint that holds every call until ``release``, counting calls and how many
    ran at once."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.runs = 0
        self.peak = 0
        self._running = 0
        self._lock = threading.Lock()

    def __call__(self, x):
        with self._lock:
            self.runs += 1
            self._running += 1
            self.peak = max(self.peak, self._running)
        self.entered.set()
        self.release.wait(20)
        with self._lock:
            self._running -= 1
        return x * 2


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run ``fn`` in a thread; the list gets its result or the exception it raised."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn(*args, **kwargs))
        except BaseException as err:   # looked at by the test
            out.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_request_bytes_in_flight_are_bounded_server_wide(serve) -> None:
    gate = Gate()
    server, client = serve({"gate": gate, "double": lambda x: x * 2},
                           client_options={"transport": "grpc", "timeout": 30},
                           max_inflight_bytes=1 << 20)
    big = np.ones(150_000, np.float32)                       # 600,000 bytes
    thread, out = in_thread(client.forward, "gate", (big,))
    assert gate.entered.wait(10)
    assert server.service.inflight.held == 600_000           # held while the model runs
    with pytest.raises(gradserve.ResourceExhausted,
                       match="the server holds 600000 bytes of requests, and 600000 more "
                             "would pass its limit of 1048576"):
        client.forward("double", (big,))
    small = np.ones(100_000, np.float32)                     # 400,000 bytes: still fits
    np.testing.assert_array_equal(client.forward("double", (small,)).outputs, 2 * small)
    assert gate.runs == 1
    gate.release.set()
    thread.join(10)
    np.testing.assert_array_equal(out[0].outputs, 2 * big)
    assert server.service.inflight.held == 0                 # given back
    np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)


def test_workers_bound_the_calls_running_at_once(serve) -> None:
    gate = Gate()
    server, client = serve({"gate": gate}, client_options={"transport": "grpc"}, workers=1)
    first, first_out = in_thread(client.forward, "gate", (np.full(3, 1.0),), timeout=30)
    assert gate.entered.wait(10)
    second, second_out = in_thread(client.forward, "gate", (np.full(3, 2.0),), timeout=30)
    wait_until(lambda: server.service.active_streams() == 2, timeout=5)
    with pytest.raises(gradserve.DeadlineExceeded):        # queued, and its client leaves
        client.forward("gate", (np.full(3, 3.0),), timeout=0.5)
    assert server.service.active_streams() == 3            # both wait their turn...
    assert gate.runs == 1                                  # ...without running
    time.sleep(0.5)   # the server's own deadline timer may fire a moment after the client's
    gate.release.set()
    first.join(10)
    second.join(10)
    np.testing.assert_array_equal(first_out[0].outputs, np.full(3, 2.0))
    np.testing.assert_array_equal(second_out[0].outputs, np.full(3, 4.0))
    wait_until(lambda: server.service.active_streams() == 0, timeout=5)
    assert gate.peak == 1                                  # never two at once
    assert gate.runs == 2                                  # the call whose client left never ran


def test_a_backward_gives_up_after_retry_seconds(serve, faulty) -> None:
    server, _ = serve({"mlp": mlp()}, client_options={"transport": "grpc"})
    client, channel = faulty(server.address, transport="grpc", retry_seconds=1.5)
    x = torch.randn(3, 6, requires_grad=True)
    y = client.torch("mlp")(x)                             # no deadline: retry_seconds applies
    server.stop(grace=0)
    start = time.monotonic()
    with pytest.raises(gradserve.Unavailable, match=UNREACHABLE):
        y.sum().backward()
    elapsed = time.monotonic() - start
    assert channel.calls["Vjp"] >= 3                       # sent, and re-sent while it was down
    assert 0.5 < elapsed < 10.0                            # retried a while; not the default 30 s


@needs_shm
def test_a_lapsed_lease_ends_the_session_and_the_residuals_viewing_it(serve, faulty) -> None:
    model = mlp()
    server, _ = serve({"mlp": model}, client_options={"transport": "grpc"}, session_lease=0.5)
    client, channel = faulty(server.address, transport="shm")
    channel.fail("KeepAlive", grpc.StatusCode.UNAVAILABLE, times=1000)   # its keep-alive stops
    sid = client.session_info().id
    x = np.ones((8192, 6), np.float32)                     # 192 KiB: through a request slot
    kept = client.forward("mlp", (x,), need_vjp=True)      # views the session's memory
    inline = client.forward("mlp", (x[:2],), need_vjp=True)   # views nothing of it
    assert server.residuals.stats("mlp").count == 2
    assert server.sessions.budget.used(pb.SHARED_MEMORY) > 0
    wait_until(lambda: server.sessions.count() == 0, timeout=10)
    assert channel.calls["KeepAlive"] >= 1                 # it tried, and was not heard
    with pytest.raises(StatusError) as info:
        server.sessions.info(sid)
    assert info.value.reason == "session-missing"
    assert server.residuals.stats("mlp").count == 1        # the viewing one went with it
    wait_until(lambda: server.sessions.budget.used(pb.SHARED_MEMORY) == 0, timeout=5)
    grads = client.vjp(kept.residual, np.ones((8192, 4), np.float32))   # recomputed
    want = local_input_grad(model, torch.from_numpy(x), torch.ones(8192, 4))
    torch.testing.assert_close(torch.from_numpy(grads.args[0]), want, rtol=1e-6, atol=1e-6)
    assert client.session_info().id != sid                 # a new session took its place
    del inline
