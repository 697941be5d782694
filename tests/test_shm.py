"""The same-host shared-memory transport: selection, security, lifetimes, faults."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.server import Server
from gradserve.transport import shm
from gradserve.transport.arena import Arena
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from models import local_input_grad, mlp

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs /dev/shm")


def gradserve_names() -> list[str]:
    return [n for n in os.listdir(shm.SHM_DIR) if n.startswith("gradserve-")]


def double(x):
    return x * 2


def test_auto_picks_shm_and_leaves_no_names_behind(serve) -> None:
    before = gradserve_names()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    server, client = serve({"m": model})
    assert client.transport == "shm" and client.fallback_reason == ""
    assert gradserve_names() == before    # unlinked as soon as both sides mapped them
    x, ct = torch.randn(512, 64, requires_grad=True), torch.randn(512, 64)
    client.torch("m")(x).backward(ct)
    torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-6, atol=1e-6)
    assert server.sessions.count() == 1


def test_forced_shm_fails_at_connect_and_auto_falls_back(serve, monkeypatch) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})

    def other_namespace(name, size):
        raise FileNotFoundError(2, "No such file or directory", name)

    monkeypatch.setattr(shm, "open_region", other_namespace)
    with pytest.raises(gradserve.GradserveError, match="the shm transport cannot work here: "
                                                       "cannot map the server's shared memory"):
        gradserve.connect(server.address, transport="shm")
    with gradserve.connect(server.address) as client:
        assert client.transport == "grpc"
        assert "another host or in another IPC namespace" in client.fallback_reason
        np.testing.assert_array_equal(client.forward("double", (np.ones(3),)).outputs, 2 * np.ones(3))
    assert server.sessions.count() == 0   # the failed sessions were closed


def raw(server):
    return pb_grpc.GradserveStub(grpc.insecure_channel(server.address))


def test_wrong_nonce_is_refused_and_cleaned_up(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    stub = raw(server)
    opened = stub.OpenSession(pb.OpenSessionRequest(arena_bytes=1 << 20))
    with pytest.raises(grpc.RpcError) as info:
        stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=opened.session_id, nonce=b"x" * 32))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not share memory" in info.value.details()
    assert server.sessions.count() == 0
    assert not any(opened.session_id in n for n in gradserve_names())
    assert opened.probe_region not in gradserve_names()


def test_arena_size_is_bounded(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      max_shm_arena_bytes=1 << 20)
    with pytest.raises(grpc.RpcError) as info:
        raw(server).OpenSession(pb.OpenSessionRequest(arena_bytes=2 << 20))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def forward_with_ref(server, client, ref, session_id=None, shape=(4,)):
    header = pb.ForwardRequest(endpoint="double", args=pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(shape), shm=ref))])))
    if session_id is not False:
        header.session.id = session_id or client._session.id
    return list(raw(server).Forward(iter([pb.ForwardFrame(header=header)]), timeout=10))


@pytest.mark.parametrize("ref, match", [
    (pb.ShmRef(offset=1 << 20, nbytes=16), "lies outside the 1048576-byte segment 0"),
    (pb.ShmRef(segment=1, offset=0, nbytes=16), "shared-memory segment 1 is not in use in this session"),
    (pb.ShmRef(offset=2**64 - 8, nbytes=16), "lies outside"),
    (pb.ShmRef(offset=1048570, nbytes=16), "lies outside"),
    (pb.ShmRef(offset=0, nbytes=8), "slot holds 8 bytes but dtype x shape needs 16"),
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
        forward_with_ref(server, client, pb.ShmRef(offset=0, nbytes=16), session_id="forged")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("gradserve-reason", "session-missing") in info.value.trailing_metadata()
    with pytest.raises(grpc.RpcError) as info:
        forward_with_ref(server, client, pb.ShmRef(offset=0, nbytes=16), session_id=False)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no payload this transport can read (shm)" in info.value.details()


def test_reply_slots_are_not_reused_while_viewed(serve) -> None:
    server, client = serve({"double": double}, client_options={"arena_bytes": 1 << 20})
    arena = server.sessions._sessions[client._session.id].shm
    first = client.forward("double", (np.full(16384, 1.0, np.float32),)).outputs   # 64 KiB
    view = torch.from_numpy(first)[::2]       # a view of a view keeps the slot too
    del first
    for i in range(40):                       # far more than the arena holds at once
        out = client.forward("double", (np.full(16384, float(i), np.float32),)).outputs
        assert out[0] == 2.0 * i
        del out
        gc.collect()
    assert torch.all(view == 2.0)
    client.describe("double")                 # carries freed slots to the server
    assert arena.used_bytes == 65536          # only the slot still viewed
    del view
    gc.collect()
    client.describe("double")
    assert arena.used_bytes == 0


def test_a_killed_client_is_reclaimed_after_its_lease(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"}, session_lease=0.5)
    code = textwrap.dedent(f"""
        import time, gradserve, numpy as np
        client = gradserve.connect({server.address!r}, transport="shm")
        client.forward("double", (np.ones(65536, np.float32),))
        print(client._session.id, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        assert server.sessions.count() == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while server.sessions.count() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.sessions.count() == 0
    assert not gradserve_names()


def check_restart_reopens_the_session(device: str, transport: str, tol: float) -> None:
    """A call after the server restarted on the same port reopens the session and matches
    local autograd; the client keeps ``transport``."""
    model = mlp().to(device)
    first = Server("127.0.0.1", 0)
    first.add_torch("mlp", model)
    first.start()
    port = first.port
    client = gradserve.connect(first.address, transport=transport)
    old = client._session.id
    x = torch.randn(4096, 6, device=device, requires_grad=True)   # 96 KiB: not inline
    ct = torch.randn(4096, 4, device=device)
    client.torch("mlp")(x).backward(ct)
    first.stop(grace=0)
    second = Server("127.0.0.1", port)
    second.add_torch("mlp", model)
    second.start()
    try:
        x.grad = None
        client.torch("mlp")(x).backward(ct)
        assert client.transport == transport and client._session.id != old
        torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=tol, atol=tol)
    finally:
        client.close()
        second.stop(grace=0)


def test_server_restart_reopens_the_session() -> None:
    check_restart_reopens_the_session("cpu", "shm", 1e-6)


def test_arenas_grow_on_demand_and_leave_no_names(serve) -> None:
    before = gradserve_names()
    server, client = serve({"double": double, "tile": lambda x: x.repeat(8)},
                           client_options={"arena_bytes": 1 << 20})
    peer = client._session.shm
    served = server.sessions._sessions[client._session.id].shm
    big = np.arange(1 << 20, dtype=np.float32)             # 4 MiB: larger than the arena
    out = client.forward("double", (big,)).outputs
    np.testing.assert_array_equal(out, 2 * big)
    assert [s.arena.size for s in peer.segments] == [1 << 20, 4 << 20]   # grown for the input
    assert served.used_bytes == 4 << 20     # and the output went through the grown segment
    assert gradserve_names() == before      # grown segments are unlinked once both mapped them
    small = np.ones(32768, np.float32)                     # 128 KiB in, 1 MiB out
    held = [client.forward("tile", (small,)).outputs for _ in range(6)]
    for tiled in held:
        np.testing.assert_array_equal(tiled, np.ones(262144, np.float32))
    # the reply arena filled up (one reply came as bytes) and grew for the next calls
    assert len(peer.segments) == len(served.segments) == 3
    assert peer.segments[2].arena.size == 5 << 20
    assert served.used_bytes >= 5 << 20
    del out, held, tiled
    gc.collect()
    client.describe("double")
    assert served.used_bytes == 0 and peer.used_bytes == 0


def test_arena_limit_falls_back_to_bytes(serve) -> None:
    server, client = serve({"double": double}, client_options={"arena_bytes": 1 << 20},
                           max_shm_arena_bytes=2 << 20)
    grows = []
    stub = client._session._stub
    real_grow = stub.GrowSession
    stub.GrowSession = lambda *a, **k: grows.append(1) or real_grow(*a, **k)
    big = np.arange(1 << 20, dtype=np.float32)             # 4 MiB: over the 2 MiB limit
    for _ in range(3):
        np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)
    assert len(grows) == 1              # refused once: later calls do not ask again
    assert len(client._session.shm.segments) == 1
    small = np.ones(8192, np.float32)                      # 32 KiB: through the arena
    np.testing.assert_array_equal(client.forward("double", (small,)).outputs, 2 * small)
    stub = raw(server)
    with pytest.raises(grpc.RpcError) as info:
        stub.GrowSession(pb.GrowSessionRequest(session_id=client._session.id, min_bytes=2 << 20))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this server's limit of 2097152" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=client._session.id, segment=7))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "segment 7 is not awaiting confirmation" in info.value.details()


def test_a_full_dev_shm_is_refused_not_fatal(serve, monkeypatch) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})

    real = os.posix_fallocate

    def no_space(fd, offset, size):
        if size > 1 << 20:    # room for the probe, not for an arena
            raise OSError(28, "No space left on device")
        real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with gradserve.connect(server.address) as client:
        assert client.transport == "grpc"
        assert "cannot create 16777216 bytes of shared memory" in client.fallback_reason
        np.testing.assert_array_equal(client.forward("double", (np.ones(3),)).outputs, 2 * np.ones(3))
    assert not gradserve_names() and server.sessions.count() == 0


def test_jax_client_over_shared_memory(serve) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    model = torch.nn.Linear(128, 32)
    _, client = serve({"lin": model})
    assert client.transport == "shm"
    x = jnp.ones((256, 128))
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    g = jax.jit(jax.grad(lambda v: jnp.sum(jnp.tanh(client.jax("lin")(v)))))(x)
    want = jax.grad(lambda v: jnp.sum(jnp.tanh(v @ w.T + b)))(x)
    np.testing.assert_allclose(g, want, rtol=2e-5, atol=2e-5)


def test_arena_allocator_aligns_coalesces_and_fills() -> None:
    arena = Arena(1024)
    a, b, c = arena.alloc(1), arena.alloc(100), arena.alloc(64)
    assert (a, b, c) == (0, 64, 192)               # 64-byte aligned, first fit
    assert arena.alloc(1024) is None               # full enough: caller falls back to bytes
    assert arena.free(b) and not arena.free(b)     # double free is refused
    assert arena.alloc(128) == 64                  # the hole is reused
    for offset in (a, 64, c):
        arena.free(offset)
    assert arena.used_bytes == 0 and arena.alloc(1024) == 0   # coalesced back into one block


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
    arena = client._session.shm
    x = client.empty((1024, 64))                     # 256 KiB in the request arena
    x.copy_(torch.randn(1024, 64))
    assert arena.used_bytes == 256 << 10
    with torch.no_grad():
        y = client.torch("lin")(x)
    assert arena.used_bytes == 256 << 10            # no slot was taken for the call
    torch.testing.assert_close(y, model(x).detach(), rtol=1e-6, atol=1e-6)
    xg = x.requires_grad_()
    client.torch("lin")(xg).sum().backward()
    torch.testing.assert_close(xg.grad, model.weight.detach().sum(0).expand(1024, 64),
                               rtol=1e-6, atol=1e-6)
    a = client.as_shared(np.arange(65536, dtype=np.float64))
    np.testing.assert_array_equal(client.forward("double", (a,)).outputs, 2 * a)
    del x, xg, y, a
    gc.collect()
    assert arena.used_bytes == 0                    # the user's slots go with their tensors
    plain = gradserve.connect(client.address, transport="grpc")
    assert isinstance(plain.empty((2, 2), "int64", like="numpy"), np.ndarray)
    plain.close()


def test_a_dropped_client_stops_keeping_its_session_alive(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"}, session_lease=0.6)
    client = gradserve.connect(server.address, transport="shm")
    time.sleep(1.0)                  # the keep-alive (every lease/3) holds it open
    assert server.sessions.count() == 1
    del client                       # no close(): its keep-alive must stop by itself
    gc.collect()
    deadline = time.monotonic() + 10
    while server.sessions.count() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.sessions.count() == 0


def test_a_segment_the_client_has_not_mapped_gets_no_replies() -> None:
    import mmap
    peer = shm.ServerPeer(mmap.mmap(-1, 1 << 16), mmap.mmap(-1, 1 << 16), 1 << 16)
    peer.add_segment(mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 1 << 20), 1 << 20, ready=False)
    data = memoryview(np.ones(1 << 15, np.float32))     # 128 KiB: fits only segment 1
    assert peer.place(data) is None                     # bytes, until the client confirms it
    peer.segments[1].ready = True
    ref, allocated = peer.place(data)
    assert (ref.segment, ref.offset, ref.nbytes, allocated) == (1, 0, 1 << 17, True)
