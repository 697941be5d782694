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


# -- same-host sessions -----------------------------------------------------------------
pytestmark_shm = pytest.mark.skipif(bool(shm.available()), reason="needs /dev/shm")


def names(server: Server) -> list[str]:
    """The region names ``server`` has in /dev/shm."""
    import os
    prefix = f"gradserve-{server.sessions.settings.owner}-"
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))


def ask(region_bytes: int = 1 << 20) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(transports=[pb.TransportRequest(kind=pb.SHARED_MEMORY,
                                                                 region_bytes=region_bytes)])


def probe_proofs(opened: pb.OpenSessionResponse) -> list[pb.RegionProof]:
    """What a client that maps the probes sends back."""
    proofs = []
    for region in opened.regions:
        mapped = shm.open_region(region.handle.decode(), region.nbytes)
        proofs.append(pb.RegionProof(region=region.index, nonce=bytes(mapped[:32])))
        mapped.close()
    return proofs


@pytestmark_shm
def test_an_unproved_session_holds_a_page_and_goes_within_seconds(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           session_proof_seconds=0.5, max_sessions_per_peer=32)
    stub = raw(server)
    opened = [stub.OpenSession(ask(1 << 30)) for _ in range(20)]   # 20 x 2 GiB asked for
    assert server.sessions.budget.used(pb.SHARED_MEMORY) == 20 * 4096   # 20 probes, no more
    assert len(names(server)) == 20
    assert not stub.KeepAlive(pb.SessionRequest(session_id=opened[0].session_id)).open
    legitimate_call_works(client)
    deadline = time.monotonic() + 10
    while server.sessions.count() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.sessions.count() == 0 and not names(server)
    assert server.sessions.budget.used(pb.SHARED_MEMORY) == 0


def confirmed(stub: pb_grpc.GradserveStub) -> str:
    """A session opened and proved the way a client does, with its regions confirmed."""
    opened = stub.OpenSession(ask())
    proved = stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=opened.session_id,
                                                          proofs=probe_proofs(opened)))
    stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=opened.session_id,
                                                 proofs=probe_proofs(proved)))
    return opened.session_id


def connection(server: Server) -> pb_grpc.GradserveStub:
    """A stub on a connection of its own."""
    return pb_grpc.GradserveStub(grpc.insecure_channel(
        server.address, options=[("grpc.use_local_subchannel_pool", 1)]))


@pytestmark_shm
def test_sessions_are_bounded_per_connection_and_per_server(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           max_sessions=3, max_sessions_per_peer=2)
    stub = connection(server)
    confirmed(stub)
    confirmed(stub)
    with pytest.raises(grpc.RpcError) as info:
        stub.OpenSession(ask())
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this connection holds 2 same-host sessions" in info.value.details()
    other = connection(server)
    confirmed(other)
    with pytest.raises(grpc.RpcError) as info:
        connection(server).OpenSession(ask())
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this server holds 3 same-host sessions, its limit" in info.value.details()
    legitimate_call_works(client)


@pytestmark_shm
def test_unproved_sessions_cannot_lock_out_a_real_client(serve) -> None:
    server, _ = serve({"mlp": mlp()}, client_options={"transport": "grpc"}, max_sessions=8,
                      max_sessions_per_peer=100)
    stub = connection(server)
    openers = [stub.OpenSession(ask()) for _ in range(30)]     # never proved
    assert server.sessions.count() <= 2                          # a quarter of the table
    assert not stub.KeepAlive(pb.SessionRequest(session_id=openers[0].session_id)).open
    with gradserve.connect(server.address) as client:
        assert client.transport == "shm"
        legitimate_call_works(client)


@pytestmark_shm
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
    deadline = time.monotonic() + 5
    while server.sessions.budget.used(pb.SHARED_MEMORY) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.sessions.budget.used(pb.SHARED_MEMORY) == 0


@pytestmark_shm
def test_duplicate_confirmations_race_cleanly(serve) -> None:
    server, _ = serve({"mlp": mlp()}, client_options={"transport": "grpc"})
    stub = raw(server)
    for _ in range(5):
        opened = stub.OpenSession(ask())
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
    assert not names(server)


@pytestmark_shm
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
        opened = raw(live).OpenSession(ask())            # live: a probe under its name
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


def test_a_backward_in_flight_across_a_restart_is_re_sent() -> None:
    from models import local_input_grad

    from faults import fault_client

    model = mlp()
    first = Server("127.0.0.1", 0)
    first.add_torch("mlp", model)
    first.start()
    port = first.port
    client, channel = fault_client(first.address, transport="grpc", timeout=20)
    try:
        x = torch.randn(5, 6, requires_grad=True)
        ct = torch.randn(5, 4)
        y = client.torch("mlp")(x)                 # the forward ran on the first server
        first.stop(grace=0)                        # SIGTERM: its residuals are gone with it
        servers: list[Server] = []

        def come_back() -> None:
            time.sleep(0.8)
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
        start = time.monotonic()
        with pytest.raises(gradserve.Unavailable):
            y.sum().backward()
        assert time.monotonic() - start < 3.0
    finally:
        client.close()


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
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(port_address))
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stalled_streams_starve_neither_calls_nor_health_checks(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"}, workers=2)
    attack = Stalled(server.address)
    try:
        attack.open(8)                              # four times the model's workers
        time.sleep(0.3)
        legitimate_call_works(client)
        start = time.monotonic()
        assert healthy(server.address) and time.monotonic() - start < 1.0
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
        assert time.monotonic() - start < 3.0
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
        time.sleep(0.3)
        assert server.service.active_streams() == 4      # each blocked sending, never read
        deadline = time.monotonic() + 5
        while server.service.active_streams() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.service.active_streams() == 0
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
        first, second, third = attack.open(3)
        with pytest.raises(grpc.RpcError) as info:
            list(third)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this connection has 2 Forward/Vjp calls open" in info.value.details()
        legitimate_call_works(client)                  # another connection
    finally:
        attack.close()


def test_open_calls_are_bounded_and_probes_answer_on_their_own_port(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"},
                           max_streams=3, health_port=0)
    attack = Stalled(server.address)
    try:
        attack.open(3, separate=True)
        time.sleep(0.3)
        with pytest.raises(gradserve.ResourceExhausted):
            client.forward("mlp", (np.ones((1, 6), np.float32),))
        start = time.monotonic()
        assert healthy(f"127.0.0.1:{server.health_port}") and time.monotonic() - start < 1.0
    finally:
        attack.close()
    deadline = time.monotonic() + 5
    while server.service.active_streams() and time.monotonic() < deadline:
        time.sleep(0.1)
    legitimate_call_works(client)


def test_a_long_model_run_is_not_taken_for_a_stall(serve) -> None:
    def slow(x):
        time.sleep(1.2)
        return x * 2

    _, client = serve({"slow": slow}, client_options={"transport": "grpc"}, idle_timeout=0.4)
    np.testing.assert_array_equal(client.forward("slow", (np.ones(3),)).outputs, 2 * np.ones(3))


def test_parameters_nobody_reads_are_cancelled(serve) -> None:
    big = torch.nn.Linear(1024, 2048)                 # 8 MiB of parameters
    server, client = serve({"big": big, "mlp": mlp()}, client_options={"transport": "grpc"},
                           idle_timeout=0.5)
    channel = grpc.insecure_channel(server.address)
    calls = [pb_grpc.GradserveStub(channel).GetParameters(
        pb.GetParametersRequest(endpoint="big"), timeout=60) for _ in range(3)]
    try:
        time.sleep(2.5)
        for call in calls:                             # each was cancelled, not left to hang
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
        legitimate_call_works(client)
    finally:
        channel.close()


@pytestmark_shm
def test_a_residual_made_while_its_session_ended_goes_too(serve) -> None:
    entered, release = threading.Event(), threading.Event()

    def waits(x):
        entered.set()
        release.wait(10)
        return x * 2

    server, client = serve({"waits": waits})
    x = torch.ones(8192, requires_grad=True)          # 32 KiB: through a request slot
    result: list = []
    thread = threading.Thread(target=lambda: result.append(client.torch("waits")(x)))
    thread.start()
    entered.wait(10)
    server.sessions.close(client.session_info().id)   # ends while the forward runs
    release.set()
    thread.join(10)
    assert client.describe("waits").residuals.count == 0
    result[0].sum().backward()                        # recomputed
    assert torch.equal(x.grad, torch.full((8192,), 2.0))


@pytestmark_shm
def test_growth_waits_for_a_spent_budget_rather_than_giving_up(serve) -> None:
    from faults import fault_client

    server, _ = serve({"double": lambda x: x * 2}, client_options={"transport": "grpc"},
                      max_shm_total_bytes=(2 << 20) + (4 << 20) + (1 << 20))
    client, channel = fault_client(server.address, arena_bytes=1 << 20)
    hog = gradserve.connect(server.address, arena_bytes=2 << 20)   # takes 4 MiB of the 7
    try:
        big = np.ones(1 << 20, np.float32)           # 4 MiB: growing needs 8 MiB, not there
        np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)
        assert channel.calls["GrowSession"] == 1
        hog.close()
        time.sleep(1.1)                                # past the retry interval
        mid = np.ones(3 << 17, np.float32)             # 1.5 MiB: fits once the budget freed up
        np.testing.assert_array_equal(client.forward("double", (mid,)).outputs, 2 * mid)
        assert channel.calls["GrowSession"] == 2
        assert client.session_info().sizes("shared-memory", "request") == [1 << 20, 3 << 19]
    finally:
        client.close()


@pytestmark_shm
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
