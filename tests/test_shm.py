"""The same-host shared-memory transport: selection, security, lifetimes, faults."""

from __future__ import annotations

import gc
import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.client.transports import shm
from gradserve.server import Server
from gradserve.server.transports import SessionSettings
from gradserve.server.transports.base import Budget
from gradserve.server.transports.shm import ShmTransport
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.slots import Arena
from helpers import ask_shm, double, free_port, needs_cuda, needs_shm, raw, wait_until
from helpers import shm_names, without_ucx
from models import local_input_grad, mlp

pytestmark = needs_shm
SHM = "shared-memory"


def served(server, client) -> gradserve.client.SessionInfo:
    """The server's view of ``client``'s session."""
    return server.sessions.info(client.session_info().id)


def test_auto_picks_shm_and_leaves_no_names_behind(serve) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    server, client = serve({"m": model})
    assert client.transport == "shm" and client.fallback_reason == ""
    assert not shm_names(server)        # unlinked as soon as both sides mapped them
    x, ct = torch.randn(512, 64, requires_grad=True), torch.randn(512, 64)
    client.torch("m")(x).backward(ct)
    torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-6, atol=1e-6)
    assert server.sessions.count() == 1
    info = client.session_info()
    assert info.transports == ("shm",)
    assert info.sizes(SHM, "request") == info.sizes(SHM, "reply") == [16 << 20]


def test_forced_shm_fails_at_connect_and_auto_falls_back(serve, monkeypatch) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    without_ucx(monkeypatch)   # else auto takes UCX to a server it cannot map (test_ucx.py)

    def other_namespace(name, size):
        raise FileNotFoundError(2, "No such file or directory", name)

    monkeypatch.setattr(shm, "open_region", other_namespace)
    with pytest.raises(gradserve.GradserveError, match="the shm transport cannot work here: "
                                                       "cannot map the server's shared memory"):
        gradserve.connect(server.address, transport="shm")
    with gradserve.connect(server.address) as client:
        assert client.transport == "grpc" and client.session_info() is None
        assert "another host or in another IPC namespace" in client.fallback_reason
        np.testing.assert_array_equal(client.forward("double", (np.ones(3),)).outputs, 2 * np.ones(3))
    assert server.sessions.count() == 0   # the failed sessions were closed
    assert not shm_names(server)


def test_wrong_nonce_is_refused_and_cleaned_up(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    stub = raw(server)
    opened = stub.OpenSession(ask_shm())
    assert [(r.kind, r.direction, r.nbytes) for r in opened.regions] == \
        [(pb.SHARED_MEMORY, pb.PROBE, 4096)]      # nothing larger before the proof
    proofs = [pb.RegionProof(region=r.index, nonce=b"x" * 32) for r in opened.regions]
    with pytest.raises(grpc.RpcError) as info:
        stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=opened.session_id, proofs=proofs))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the nonce of region 0 does not match" in info.value.details()
    assert server.sessions.count() == 0
    assert not shm_names(server)


def test_region_size_is_bounded_and_unknown_kinds_are_refused(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      max_shm_arena_bytes=1 << 20)
    request = ask_shm(2 << 20)
    request.transports.add(kind=77)
    opened = raw(server).OpenSession(request)
    assert not opened.regions and not opened.session_id
    assert [(r.kind, r.reason) for r in opened.refused] == [
        (pb.SHARED_MEMORY, "regions of 2097152 bytes asked for; this server allows 4096 to 1048576"),
        (77, "this server offers no region kind 77")]
    assert server.sessions.count() == 0
    tiny = raw(server).OpenSession(ask_shm(1))     # no room for a nonce: refused, nothing made
    assert not tiny.regions and "allows 4096 to" in tiny.refused[0].reason
    assert not shm_names(server)
    with pytest.raises(grpc.RpcError) as info:
        raw(server).OpenSession(pb.OpenSessionRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "asks for no transport" in info.value.details()


def test_an_unconfirmed_session_is_not_kept_alive(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    opened = raw(server).OpenSession(ask_shm())
    assert not raw(server).KeepAlive(pb.SessionRequest(session_id=opened.session_id)).open
    raw(server).CloseSession(pb.SessionRequest(session_id=opened.session_id))
    assert not shm_names(server)


def forward_with_ref(server, client, ref, session_id=None, shape=(4,)):
    header = pb.ForwardRequest(endpoint="double", args=pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(shape), slot=ref))])))
    if session_id is not False:
        header.session.id = session_id or client.session_info().id
    return list(client.stub.Forward(iter([pb.ForwardFrame(header=header)]), timeout=10))


# the session's table: 0 the probe (gone once proved), 1 the request region, 2 the reply region
@pytest.mark.parametrize("ref, match", [
    (pb.SlotRef(region=1, offset=1 << 20, nbytes=16), "lies outside the 1048576-byte region 1"),
    (pb.SlotRef(region=5, offset=0, nbytes=16), "region 5 is not in use in this session"),
    (pb.SlotRef(region=0, offset=0, nbytes=16), "region 0 is not in use in this session"),
    (pb.SlotRef(region=2, offset=0, nbytes=16),
     "shared-memory region 2 is a reply region; this side reads only request regions"),
    (pb.SlotRef(region=1, offset=2**64 - 8, nbytes=16), "lies outside"),
    (pb.SlotRef(region=1, offset=1048570, nbytes=16), "lies outside"),
    (pb.SlotRef(region=1, offset=0, nbytes=8), "slot holds 8 bytes but dtype x shape needs 16"),
    (pb.SlotRef(region=1, offset=66, nbytes=16),
     "shared-memory slot offset 66 is not a multiple of the dtype's 4-byte item size"),
])
def test_slot_references_are_bounds_checked(serve, ref, match) -> None:
    server, client = serve({"double": double}, client_options={"arena_bytes": 1 << 20})
    with pytest.raises(grpc.RpcError) as info:
        forward_with_ref(server, client, ref)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in info.value.details()


def test_unknown_session_and_sessionless_slots(serve) -> None:
    server, client = serve({"double": double})
    with pytest.raises(grpc.RpcError) as info:
        forward_with_ref(server, client, pb.SlotRef(offset=0, nbytes=16), session_id="forged")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("gradserve-reason", "session-missing") in info.value.trailing_metadata()
    with pytest.raises(grpc.RpcError) as info:
        forward_with_ref(server, client, pb.SlotRef(offset=0, nbytes=16), session_id=False)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "args[0]: a slot reference needs a same-host session" in info.value.details()


def test_reply_slots_are_not_reused_while_viewed(serve) -> None:
    server, client = serve({"double": double}, client_options={"arena_bytes": 4 << 20})
    first = client.forward("double", (np.full(65536, 1.0, np.float32),)).outputs   # 256 KiB
    view = torch.from_numpy(first)[::2]       # a view of a view keeps the slot too
    del first
    for i in range(24):                       # more than the 4 MiB reply region holds at once
        out = client.forward("double", (np.full(65536, float(i), np.float32),)).outputs
        assert out[0] == 2.0 * i
        del out
    assert torch.all(view == 2.0)
    client.describe("double")                 # carries freed slots to the server
    assert served(server, client).used_bytes("reply") == 262144   # only the slot still viewed
    del view
    gc.collect()
    client.describe("double")
    assert served(server, client).used_bytes("reply") == 0


def test_freed_slots_survive_a_failed_call(serve, faulty) -> None:
    """A reply slot reported freed by a call that then fails is reported again."""
    server, _ = serve({"double": double})
    client, channel = faulty(server.address)
    out = client.forward("double", (np.ones(65536, np.float32),)).outputs   # 256 KiB reply
    assert served(server, client).used_bytes("reply") == 262144
    del out                               # freed here; reported with the next request
    assert client.session_info().pending_frees == 1
    channel.fail("Forward", grpc.StatusCode.DEADLINE_EXCEEDED, "too late")
    with pytest.raises(gradserve.DeadlineExceeded):
        client.forward("double", (np.ones(3, np.float32),))
    assert client.session_info().pending_frees == 1   # put back: the call never landed
    np.testing.assert_array_equal(client.forward("double", (np.ones(3, np.float32),)).outputs,
                                  2 * np.ones(3, np.float32))
    assert client.session_info().pending_frees == 0
    assert served(server, client).used_bytes("reply") == 0


def slow_pair(x):
    time.sleep(0.6)
    return x * 2


def bad_pair(x):
    return x * 2, object()


def test_reply_slots_of_a_reply_never_sent_are_freed(serve) -> None:
    server, client = serve({"slow": slow_pair, "bad": bad_pair})
    big = np.ones(65536, np.float32)                           # 256 KiB each way
    with pytest.raises(gradserve.Internal, match=r"outputs\[1\]: cannot send a builtins.object"):
        client.forward("bad", (big,))                      # x * 2 was placed, then encoding failed
    assert served(server, client).used_bytes("reply") == 0
    with pytest.raises(gradserve.DeadlineExceeded):
        client.forward("slow", (big,), timeout=0.2)        # the reply is made after the client left
    wait_until(lambda: served(server, client).used_bytes("reply") == 0, timeout=5)
    assert client.session_info().used_bytes("request") == 0


def test_a_reply_that_fails_to_decode_frees_its_slots(serve) -> None:
    from gradserve.client import Call
    from gradserve.wire.codec import Arguments

    server, client = serve({"double": double})

    def refuse(wire, path):
        raise ValueError(f"{path}: not today")

    call = Call("double", Arguments((np.ones(65536, np.float32),), {}))
    with pytest.raises(ValueError, match="outputs: not today"):
        client.call_forward(call, refuse, need_vjp=False)
    assert client.session_info().used_bytes("request") == 0    # the input's slot is back
    assert client.session_info().pending_frees == 1            # the output's is reported next
    client.describe("double")
    assert served(server, client).used_bytes("reply") == 0


def test_reporting_a_freed_slot_twice_frees_nothing_else(serve) -> None:
    server, client = serve({"double": double}, client_options={"arena_bytes": 4 << 20})
    first = client.forward("double", (np.ones(65536, np.float32),)).outputs
    del first
    client.describe("double")                          # its slot is free on the server now
    held = client.forward("double", (np.ones(65536, np.float32),)).outputs   # reuses offset 0
    assert served(server, client).used_bytes("reply") == 262144
    # a late duplicate of the first report names the old allocation: it must not free `held`
    old_generation = 1   # any generation but the one `held` got
    request = pb.ReleaseRequest(session=pb.SessionState(
        id=client.session_info().id,
        freed_slots=[pb.SlotRef(region=2, offset=0, generation=old_generation)]))
    client.stub.Release(request)            # from the session's own client
    assert served(server, client).used_bytes("reply") == 262144
    np.testing.assert_array_equal(held, 2 * np.ones(65536, np.float32))


def test_a_killed_client_is_reclaimed_after_its_lease(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"}, session_lease=0.5)
    code = textwrap.dedent(f"""
        import time, gradserve, numpy as np
        client = gradserve.connect({server.address!r}, transport="shm")
        client.forward("double", (np.ones(65536, np.float32),))
        print(client.session_info().id, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        assert server.sessions.count() == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    wait_until(lambda: server.sessions.count() == 0)
    assert not shm_names(server)


def test_server_restart_reopens_the_session() -> None:
    """A call after the server restarted on the same port reopens the session and matches
    local autograd; the client keeps its transport (CUDA IPC: test_cuda_ipc.py)."""
    model = mlp()
    first = Server("127.0.0.1", 0)
    first.add_torch("mlp", model)
    first.start()
    port = first.port
    client = gradserve.connect(first.address, transport="shm")
    old = client.session_info().id
    x = torch.randn(4096, 6, requires_grad=True)   # 96 KiB: not inline
    ct = torch.randn(4096, 4)
    client.torch("mlp")(x).backward(ct)
    first.stop(grace=0)
    second = Server("127.0.0.1", port)
    second.add_torch("mlp", model)
    second.start()
    try:
        x.grad = None
        client.torch("mlp")(x).backward(ct)
        assert client.transport == "shm" and client.session_info().id != old
        torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-6, atol=1e-6)
    finally:
        client.close()
        second.stop(grace=0)


def test_a_lost_session_is_reopened_once_by_many_threads(serve, faulty) -> None:
    from test_concurrency import run_threads

    model = mlp()
    server, _ = serve({"mlp": model}, workers=8)
    client, channel = faulty(server.address)
    client.forward("mlp", (np.ones((4096, 6), np.float32),))
    server.sessions.close(client.session_info().id)      # as if the server lost it
    barrier = threading.Barrier(6)

    def worker(i: int) -> None:
        x = torch.randn(4096, 6, requires_grad=True)
        ct = torch.randn(4096, 4)
        barrier.wait()
        client.torch("mlp")(x).backward(ct)
        torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-6,
                                   atol=1e-6)

    run_threads(worker, 6)
    assert channel.calls["OpenSession"] == 2       # the first, and one reopening
    assert server.sessions.count() == 2            # the fixture's client's, and the new one
    assert client.transport == "shm"


def test_a_forced_transport_never_falls_back_after_a_failed_reopen(serve, faulty) -> None:
    from gradserve.errors import REASON_KEY, SESSION_MISSING

    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    client, channel = faulty(server.address, transport="shm")
    assert client.transport == "shm"
    channel.fail("Forward", grpc.StatusCode.FAILED_PRECONDITION, "session gone",
                 trailers=((REASON_KEY, SESSION_MISSING),))
    channel.fail("OpenSession", grpc.StatusCode.UNAVAILABLE, "restarting")
    with pytest.raises(gradserve.errors.Unavailable,
                       match="the shm transport is not set up: the server is not reachable"):
        client.forward("double", (np.ones(4, np.float32),))
    assert client.transport == "grpc" and client.session_info() is None
    assert channel.calls["Forward"] == 1           # nothing went over gRPC instead
    time.sleep(1.1)                                # past the renegotiation pause
    np.testing.assert_array_equal(client.forward("double", (np.ones(4, np.float32),)).outputs,
                                  2 * np.ones(4, np.float32))
    assert client.transport == "shm" and channel.calls["OpenSession"] == 3


def test_a_client_started_before_its_server_upgrades_to_shared_memory() -> None:
    address = f"127.0.0.1:{free_port()}"
    client = gradserve.connect(address, timeout=5)       # nothing listens there yet
    assert client.transport == "grpc"
    assert "not reachable yet" in client.fallback_reason
    forced = gradserve.Client(address, transport="shm", timeout=5)
    with pytest.raises(gradserve.Unavailable, match="the shm transport is not set up"):
        forced.forward("double", (np.ones(3),))
    server = Server("127.0.0.1", int(address.rsplit(":", 1)[1]))
    server.add_torch("double", double)
    server.start()
    try:
        def answers(c: gradserve.Client) -> bool:
            try:
                c.endpoints()
                return True
            except gradserve.Unavailable:
                return False

        for c in (client, forced):     # until each channel's reconnection backoff has passed
            wait_until(lambda: answers(c), timeout=20, interval=0.2)
        time.sleep(1.1)   # past the renegotiation interval
        big = np.ones(65536, np.float32)
        for c in (client, forced):
            np.testing.assert_array_equal(c.forward("double", (big,)).outputs, 2 * big)
            assert c.transport == "shm" and c.fallback_reason == ""
        assert client.session_info().copied == 1 and served(server, client).copied == 1
    finally:
        client.close()
        forced.close()
        server.stop(grace=0)


def test_arenas_grow_on_demand_and_leave_no_names(serve) -> None:
    server, client = serve({"double": double, "tile": lambda x: x.repeat(8)},
                           client_options={"arena_bytes": 1 << 20})
    big = np.arange(1 << 20, dtype=np.float32)             # 4 MiB: larger than the region
    out = client.forward("double", (big,)).outputs
    np.testing.assert_array_equal(out, 2 * big)
    assert client.session_info().sizes(SHM, "request") == [1 << 20, 4 << 20]   # grown for it
    assert served(server, client).used_bytes("reply") == 4 << 20   # the output went there too
    assert not shm_names(server)          # grown regions are unlinked once both mapped them
    small = np.ones(32768, np.float32)                     # 128 KiB in, 1 MiB out
    held = [client.forward("tile", (small,)).outputs for _ in range(6)]
    for tiled in held:
        np.testing.assert_array_equal(tiled, np.ones(262144, np.float32))
    # the reply regions filled up (one reply came as bytes) and grew for the next calls
    sizes = client.session_info().sizes(SHM, "reply")
    assert sizes == served(server, client).sizes(SHM, "reply") == [1 << 20, 4 << 20, 5 << 20]
    assert served(server, client).used_bytes("reply") >= 5 << 20
    del out, held, tiled
    gc.collect()
    client.describe("double")
    assert served(server, client).used_bytes("reply") == 0
    assert client.session_info().used_bytes("request") == 0


def test_arena_limit_falls_back_to_bytes(serve, faulty) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      max_shm_arena_bytes=2 << 20)
    client, channel = faulty(server.address, arena_bytes=1 << 20)
    big = np.arange(1 << 20, dtype=np.float32)             # 4 MiB: over the 2 MiB limit
    for _ in range(3):
        np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)
    assert channel.calls["GrowSession"] == 1   # refused once: later calls do not ask again
    assert client.session_info().sizes(SHM, "request") == [1 << 20]
    small = np.ones(1 << 16, np.float32)                   # 256 KiB: through the region
    np.testing.assert_array_equal(client.forward("double", (small,)).outputs, 2 * small)
    assert client.session_info().copied == 1
    stub, sid = client.stub, client.session_info().id
    with pytest.raises(grpc.RpcError) as info:
        stub.GrowSession(pb.GrowSessionRequest(session_id=sid, kind=pb.SHARED_MEMORY,
                                               min_bytes=2 << 20))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this server's limit of 2097152" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.GrowSession(pb.GrowSessionRequest(session_id=sid, kind=pb.CUDA_IPC,
                                               min_bytes=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "session has no CUDA IPC regions to grow" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=sid,
                                                     proofs=[pb.RegionProof(region=7)]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "region 7 is not awaiting confirmation" in info.value.details()


def test_one_oversized_payload_does_not_stop_growth(serve, faulty) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      max_shm_arena_bytes=8 << 20)
    client, channel = faulty(server.address, arena_bytes=1 << 20)
    huge = np.ones(4 << 20, np.float32)                    # 16 MiB: over the 8 MiB limit
    for _ in range(2):
        np.testing.assert_array_equal(client.forward("double", (huge,)).outputs, 2 * huge)
    assert channel.calls["GrowSession"] == 1               # that size is not asked twice
    mid = np.ones(1 << 19, np.float32)                     # 2 MiB: fits once grown
    np.testing.assert_array_equal(client.forward("double", (mid,)).outputs, 2 * mid)
    assert client.session_info().sizes(SHM, "request") == [1 << 20, 2 << 20]


def test_a_growth_the_client_cannot_attach_to_leaves_nothing_behind(serve, monkeypatch) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    client = gradserve.connect(server.address, arena_bytes=1 << 20)
    try:
        def no_more(name, size):
            raise PermissionError(13, "Permission denied", name)

        monkeypatch.setattr(shm, "open_region", no_more)      # the session's first pair is mapped
        big = np.arange(1 << 20, dtype=np.float32)             # 4 MiB: asks to grow
        np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)
        assert client.session_info().sizes(SHM, "request") == [1 << 20]
        assert served(server, client).sizes(SHM, "request") == [1 << 20]   # dropped there too
        assert not shm_names(server)
    finally:
        client.close()


def test_releases_go_through_after_the_session_is_gone(serve) -> None:
    server, client = serve({"mlp": mlp()})
    res = client.forward("mlp", (np.ones((4096, 6), np.float32),), need_vjp=True)
    out = client.forward("mlp", (np.ones((4096, 6), np.float32),)).outputs
    server.sessions.close(client.session_info().id)          # as after a lease ran out
    del res, out                                             # a release and a freed slot queued
    assert client.describe("mlp").residuals.count == 0       # released despite the dead session
    assert client.pending_releases == 0


def test_a_transient_growth_failure_does_not_stop_growth(serve, faulty) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    client, channel = faulty(server.address, arena_bytes=1 << 20)
    channel.fail("GrowSession", grpc.StatusCode.UNAVAILABLE)
    big = np.arange(1 << 19, dtype=np.float32)              # 2 MiB
    np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)
    assert client.session_info().sizes(SHM, "request") == [1 << 20]   # went as bytes
    time.sleep(1.1)                                          # past the retry interval
    np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)
    assert channel.calls["GrowSession"] == 2
    assert client.session_info().sizes(SHM, "request") == [1 << 20, 2 << 20]


def test_a_full_dev_shm_is_refused_not_fatal(serve, monkeypatch) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})

    real = os.posix_fallocate

    def no_space(fd, offset, size):
        if size > 1 << 20:    # room for the probe, not for the regions
            raise OSError(28, "No space left on device")
        real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with gradserve.connect(server.address) as client:
        assert client.transport == "grpc"
        assert "cannot create 16777216 bytes of shared memory" in client.fallback_reason
        np.testing.assert_array_equal(client.forward("double", (np.ones(3),)).outputs, 2 * np.ones(3))
    assert not shm_names(server) and server.sessions.count() == 0


@pytest.mark.parametrize("device, tol", [
    ("cpu", 2e-5),                           # over shared memory
    pytest.param("cuda", 2e-4, marks=[pytest.mark.gpu, needs_cuda]),   # JAX GPU arrays
])
def test_jax_client_through_a_torch_linear(serve, device, tol) -> None:
    jax = pytest.importorskip("jax")
    if device == "cuda" and jax.default_backend() != "gpu":
        pytest.skip("jax has no GPU backend here")
    jnp = jax.numpy
    model = torch.nn.Linear(128, 32).to(device)
    _, client = serve({"lin": model})
    assert client.transport == {"cpu": "shm", "cuda": "cuda_ipc"}[device]
    x = jnp.ones((256, 128))
    w, b = model.weight.detach().cpu().numpy(), model.bias.detach().cpu().numpy()
    g = jax.jit(jax.grad(lambda v: jnp.sum(jnp.tanh(client.jax("lin")(v)))))(x)
    want = jax.grad(lambda v: jnp.sum(jnp.tanh(v @ w.T + b)))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=tol, atol=tol)


def test_arena_allocator_aligns_coalesces_fills_and_tells_allocations_apart() -> None:
    arena = Arena(1024)
    (a, ga), (b, gb), (c, gc_) = arena.alloc(1), arena.alloc(100), arena.alloc(64)
    assert (a, b, c) == (0, 64, 192)               # 64-byte aligned, first fit
    assert arena.alloc(1024) is None               # full enough: caller falls back to bytes
    assert arena.free(b, gb) and not arena.free(b, gb)     # double free is refused
    again, g2 = arena.alloc(128)
    assert again == 64 and g2 != gb                # the hole is reused, as a new allocation
    assert not arena.free(64, gb)                  # a stale free of the old one is refused
    assert not arena.free(64, 0)                   # generation 0 names no allocation
    assert arena.used_bytes == 64 + 128 + 64
    for offset, generation in ((a, ga), (64, g2), (c, gc_)):
        assert arena.free(offset, generation)
    assert arena.used_bytes == 0 and arena.alloc(1024)[0] == 0   # coalesced back into one block


def test_threads_share_one_session_safely(serve) -> None:
    from test_concurrency import run_threads

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    _, client = serve({"m": model}, workers=8, client_options={"arena_bytes": 4 << 20})
    f = client.torch("m")

    def worker(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        for _ in range(8):
            x = torch.randn(300 + 10 * i, 64, generator=g, requires_grad=True)   # ~80 KiB
            ct = torch.randn(300 + 10 * i, 64, generator=g)
            f(x).backward(ct)
            torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-6, atol=1e-6)

    run_threads(worker, 8)
    assert client.transport == "shm"


def test_tensors_allocated_in_the_arena_are_sent_without_a_copy(serve) -> None:
    model = torch.nn.Linear(64, 8)
    _, client = serve({"lin": model, "double": double})
    x = client.empty((1024, 64))                     # 256 KiB in the request region
    x.copy_(torch.randn(1024, 64))
    assert client.session_info().used_bytes("request") == 256 << 10
    with torch.no_grad():
        y = client.torch("lin")(x)
    info = client.session_info()
    assert info.used_bytes("request") == 256 << 10  # no slot was taken for the call
    assert (info.copied, info.in_place) == (0, 1)
    torch.testing.assert_close(y, model(x).detach(), rtol=1e-6, atol=1e-6)
    xg = x.requires_grad_()
    client.torch("lin")(xg).sum().backward()
    torch.testing.assert_close(xg.grad, model.weight.detach().sum(0).expand(1024, 64),
                               rtol=1e-6, atol=1e-6)
    a = client.as_shared(np.arange(65536, dtype=np.float64))
    np.testing.assert_array_equal(client.forward("double", (a,)).outputs, 2 * a)
    assert client.session_info().in_place == 3
    del x, xg, y, a
    gc.collect()
    assert client.session_info().used_bytes("request") == 0   # the slots go with their arrays
    plain = gradserve.connect(client.address, transport="grpc")
    assert isinstance(plain.empty((2, 2), "int64", like="numpy"), np.ndarray)
    assert torch.equal(plain.as_shared(torch.arange(3)), torch.arange(3))
    plain.close()


def test_as_shared_copies_into_a_slot_or_where_the_array_lives(serve) -> None:
    import jax.numpy as jnp

    server, client = serve({"double": double})
    kept = []
    for array in (torch.arange(8192, dtype=torch.float32), np.arange(8192, dtype=np.float32),
                  jnp.arange(8192, dtype=jnp.float32)):
        kept.append(client.as_shared(array))
        assert type(kept[-1]) is type(array)
        np.testing.assert_array_equal(np.asarray(kept[-1]), np.asarray(array))
        assert client.session_info().used_bytes("request") == 32768 * len(kept)
    _, plain = serve({"double": double}, client_options={"transport": "grpc"})
    t = torch.arange(4.0)
    copy = plain.as_shared(t)        # no session: an ordinary copy, on the tensor's device
    assert copy.device == t.device and copy.data_ptr() != t.data_ptr()
    torch.testing.assert_close(copy, t)


def test_a_dropped_client_stops_keeping_its_session_alive(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"}, session_lease=0.6)
    client = gradserve.connect(server.address, transport="shm")
    time.sleep(1.0)                  # the keep-alive (every lease/3) holds it open
    assert server.sessions.count() == 1
    del client                       # no close(): its keep-alive must stop by itself, at once
    wait_until(lambda: server.sessions.count() == 0)   # (no collector run: nothing is a cycle)


def test_a_dropped_session_is_freed_at_once(serve) -> None:
    from gradserve.client.session import Session
    from gradserve.client.transports import ShmTransport

    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    session, _ = Session.open(raw(server), [ShmTransport()])
    session.start()
    gone = weakref.ref(session)
    del session
    assert gone() is None            # its transports hold it weakly


def test_finalizer_frees_name_their_allocation_too() -> None:
    arena = Arena(1024)
    offset, generation = arena.alloc(100)
    arena.free_later(offset, generation + 1)      # a stale one (another allocation's)
    assert arena.used_bytes == 128
    arena.free_later(offset, generation)          # as a finalizer does
    assert arena.used_bytes == 0
    assert arena.alloc(1024)[0] == 0


def test_slots_freed_in_any_order_merge_back_into_one_run() -> None:
    rng = random.Random(7)
    arena = Arena(1 << 20)
    live = [arena.alloc(rng.randrange(1, 8192)) for _ in range(100)]
    for _ in range(2000):
        if live and rng.random() < 0.5:
            offset, generation = live.pop(rng.randrange(len(live)))
            assert arena.free(offset, generation)
        else:
            slot = arena.alloc(rng.randrange(1, 8192))
            if slot is not None:
                live.append(slot)
    rng.shuffle(live)
    for offset, generation in live:
        arena.free_later(offset, generation)
    assert arena.used_bytes == 0
    offset, _ = arena.alloc(1 << 20)   # the free runs merged back into one
    assert offset == 0


def server_transport(region_bytes: int, **settings: object):
    """A server-side shared-memory transport past its probe, with its first pair proved,
    and the function giving its next region index."""
    made = iter(range(100))
    config = SessionSettings(**settings)
    transport, (probe,) = ShmTransport.create(
        pb.TransportRequest(kind=pb.SHARED_MEMORY, region_bytes=region_bytes), config,
        Budget(config), lambda: next(made))
    transport.discard(probe.region)
    for new in transport.regions_for(probe.region, lambda: next(made)):
        transport.confirm(new.region)
    return transport, lambda: next(made)


def test_regions_made_while_their_session_ended_are_let_go() -> None:
    from gradserve.errors import SESSION_MISSING, StatusError
    from gradserve.server.sessions import ServerSession

    settings = SessionSettings()
    budget = Budget(settings)
    session = ServerSession("s")
    transport, made = ShmTransport.create(pb.TransportRequest(kind=pb.SHARED_MEMORY),
                                          settings, budget, session.next_index)
    names = [new.handle.decode() for new in made]
    assert budget.used(pb.SHARED_MEMORY) == 4096
    session.close()                  # swept, or evicted, while the probe was being made
    with pytest.raises(StatusError, match="same-host session 's' ended") as info:
        session.expect(transport, made)
    assert info.value.reason == SESSION_MISSING
    assert budget.used(pb.SHARED_MEMORY) == 0
    assert not any(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names)


def test_a_view_after_the_session_ended_is_a_clear_error() -> None:
    from gradserve.errors import StatusError

    transport, _ = server_transport(1 << 16)
    ref = pb.SlotRef(region=1, offset=0, nbytes=64)
    transport.check(ref, 64, "args[0]", 4)
    transport.close()
    with pytest.raises(StatusError, match="region 1 is no longer in use: the session ended") as info:
        transport.view(ref)
    assert info.value.reason == "session-missing"


def test_a_region_the_client_has_not_proved_gets_no_replies() -> None:
    transport, next_index = server_transport(1 << 16)
    try:
        grown = transport.grow(pb.GrowSessionRequest(min_bytes=1 << 20), next_index)
        assert [r.region.size for r in grown] == [1 << 20, 1 << 20]
        data = memoryview(np.ones(1 << 15, np.float32))     # 128 KiB: fits only the new pair
        assert transport.place(data) is None                # bytes, until the client proves it
        reply = grown[1].region
        transport.confirm(reply)
        ref, allocated = transport.place(data)
        assert (ref.region, ref.offset, ref.nbytes, allocated) == (reply.index, 0, 1 << 17, True)
        assert bytes(reply.view(0, 8)) == bytes(memoryview(np.ones(2, np.float32)))
    finally:
        transport.close()
    assert not any(name in shm_names() for name in (r.handle.decode() for r in grown))
    assert isinstance(reply.memory, mmap.mmap)
