"""The CUDA IPC transport: refusal without CUDA (runs everywhere) and the GPU path
(``gpu``-marked: runs only where torch sees a CUDA device and CuPy is installed)."""

from __future__ import annotations

import gc

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.wire.framing import FrameWriter
from gradserve.wire.slots import Region
from gradserve.client.transports import cuda_ipc
from gradserve.v1 import gradserve_pb2 as pb
from helpers import HAS_CUDA, double, needs_cuda, needs_shm, raw, wait_until
from models import local_input_grad, mlp

pytestmark = needs_shm

# -- everywhere --------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_forced_cuda_ipc_fails_at_connect_without_cuda(serve) -> None:
    server, client = serve({"double": double})
    assert client.transport == "shm" and client.fallback_reason == ""   # nothing to fall back from
    with pytest.raises(gradserve.GradserveError) as info:
        gradserve.connect(server.address, transport="cuda_ipc")
    assert str(info.value).startswith("the cuda_ipc transport cannot work here: ")
    assert cuda_ipc.unavailable() in str(info.value)
    assert server.sessions.count() == 1        # the refused session was closed at once


def ask(devices=("00" * 16,), pool_bytes=0) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(transports=[
        pb.TransportRequest(kind=pb.SHARED_MEMORY, region_bytes=1 << 20),
        pb.TransportRequest(kind=pb.CUDA_IPC, region_bytes=pool_bytes, devices=list(devices))])


def test_a_server_without_the_clients_gpus_makes_no_pools(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    stub = raw(server)
    opened = stub.OpenSession(ask())
    assert {r.kind for r in opened.regions} == {pb.SHARED_MEMORY}
    (refusal,) = opened.refused
    assert refusal.kind == pb.CUDA_IPC
    assert ("cannot use CUDA IPC" in refusal.reason
            or "sees none of the client's GPUs" in refusal.reason)
    stub.CloseSession(pb.SessionRequest(session_id=opened.session_id))
    # pools the server will not make are not an error: the session opens without them
    opened = stub.OpenSession(ask(pool_bytes=1 << 40))
    assert {r.kind for r in opened.regions} == {pb.SHARED_MEMORY}
    assert "this server allows 4096 to 4294967296" in opened.refused[0].reason
    stub.CloseSession(pb.SessionRequest(session_id=opened.session_id))
    assert server.sessions.count() == 0


def test_cuda_references_outside_a_cuda_session_are_refused(serve) -> None:
    server, client = serve({"double": double})
    header = pb.ForwardRequest(endpoint="double", args=pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[4],
                                  slot=pb.SlotRef(region=3, offset=0, nbytes=16)))])))
    header.session.id = client.session_info().id
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Forward(iter([pb.ForwardFrame(header=header)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "args[0]: region 3 is not in use in this session" in info.value.details()


class FakeDeviceMemory:
    """Stands in for CuPy memory: the checks read only sizes, directions and readiness."""

    ptr = 1 << 40


@pytest.mark.parametrize("ref, match", [
    (pb.SlotRef(region=0, offset=1 << 20, nbytes=16), "lies outside the 1048576-byte region 0"),
    (pb.SlotRef(region=0, offset=2**64 - 8, nbytes=16), "lies outside"),
    (pb.SlotRef(region=1, offset=0, nbytes=16), "CUDA IPC region 1 is not in use in this session"),
    (pb.SlotRef(region=2, offset=0, nbytes=16),
     "CUDA IPC region 2 is a request region; this side reads only reply regions"),
    (pb.SlotRef(region=3, offset=0, nbytes=16), "CUDA IPC region 3 is not in use in this session"),
    (pb.SlotRef(region=0, offset=0, nbytes=8), "slot holds 8 bytes but dtype x shape needs 16"),
])
def test_cuda_references_are_bounds_checked(ref, match) -> None:
    # the client's side of a CUDA IPC session: no GPU memory is touched by the checks
    transport = cuda_ipc.CudaIpcTransport()
    for index, direction, ready in ((0, pb.REPLY, True), (1, pb.REPLY, False),
                                    (2, pb.REQUEST, True)):
        transport.add(Region(index, pb.CUDA_IPC, direction, "uuid", 1 << 20, FakeDeviceMemory(),
                             gpu=0, ready=ready))
    with pytest.raises(gradserve.errors.StatusError) as info:
        transport.check(ref, 16, "outputs")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert match in str(info.value)


# -- on a GPU ----------------------------------------------------------------
def pools_in_use(info, direction: str) -> int:
    return sum(r.used_bytes for r in info.regions if r.kind == "CUDA IPC" and r.direction == direction)


def pool(info, direction: str):
    (found,) = [r for r in info.regions if r.kind == "CUDA IPC" and r.direction == direction]
    return found


@pytest.mark.gpu
@needs_cuda
def test_cuda_tensors_go_through_ipc_pools(serve_elsewhere) -> None:
    address, _ = serve_elsewhere("cuda")          # the model on the GPU, in another process
    model = mlp().cuda()
    with gradserve.connect(address) as client:
        assert client.transport == "cuda_ipc" and client.fallback_reason == ""
        assert client.describe("mlp").devices == ("cuda:0",)
        f = client.torch("mlp")
        x = torch.randn(4096, 6, device="cuda", requires_grad=True)
        ct = torch.randn(4096, 4, device="cuda")
        y = f(x)
        assert y.is_cuda and y.device == x.device
        info = client.session_info()
        reply = pool(info, "reply")
        assert reply.address <= y.data_ptr() < reply.address + reply.size   # a view of the pool
        assert info.transports == ("shm", "cuda_ipc") and (info.copied, info.in_place) == (1, 0)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
        y.backward(ct)
        torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_backward_calling_its_own_process_is_refused_not_hung(serve) -> None:
    _, client = serve({"mlp": mlp().cuda()})
    assert client.transport == "cuda_ipc"          # the pools are mapped, not opened
    info = client.describe("mlp")
    assert info.same_process and info.devices == ("cuda:0",)
    x = torch.randn(64, 6, device="cuda", requires_grad=True)
    y = client.torch("mlp")(x)
    with pytest.raises(gradserve.GradserveError, match="its server runs in this process"):
        y.sum().backward()
    xc = x.detach().cpu().requires_grad_(True)      # CPU tensors backpropagate on this thread
    client.torch("mlp")(xc).sum().backward()
    assert xc.grad is not None and xc.grad.shape == (64, 6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_and_cpu_tensors_in_one_call(serve) -> None:
    def mixed(a, b):
        return a * b.to(a.device), (a.sum() + b.sum().to(a.device)).cpu()

    _, client = serve({"mixed": mixed})
    a = torch.randn(8192, device="cuda", requires_grad=True)     # CUDA IPC
    b = torch.randn(8192, requires_grad=True)                   # shared memory
    out, total = client.torch("mixed")(a, b)
    assert out.is_cuda and not total.is_cuda
    (out.sum() + total).backward()
    torch.testing.assert_close(a.grad, b.detach().cuda() + 1)
    torch.testing.assert_close(b.grad, a.detach().cpu() + 1)


@pytest.mark.gpu
@needs_cuda
def test_tensors_allocated_in_the_pool_are_sent_without_a_copy(serve) -> None:
    model = torch.nn.Linear(64, 8).cuda()
    _, client = serve({"lin": model})
    x = client.empty((1024, 64), device="cuda")
    assert x.is_cuda
    x.copy_(torch.randn(1024, 64, device="cuda"))
    assert pools_in_use(client.session_info(), "request") == 256 << 10
    with torch.no_grad():
        y = client.torch("lin")(x)
    info = client.session_info()
    assert pools_in_use(info, "request") == 256 << 10 and (info.copied, info.in_place) == (0, 1)
    torch.testing.assert_close(y, model(x).detach(), rtol=1e-5, atol=1e-5)
    del x, y
    gc.collect()
    assert pools_in_use(client.session_info(), "request") == 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_reply_slots_are_not_reused_while_viewed(serve) -> None:
    server, client = serve({"double": double})
    first = client.torch("double")(torch.full((16384,), 1.0, device="cuda"))
    view = first[::2]
    del first
    for i in range(40):
        out = client.torch("double")(torch.full((16384,), float(i), device="cuda"))
        assert out[0].item() == 2.0 * i
        del out
        gc.collect()
    assert torch.all(view == 2.0)
    sid = client.session_info().id
    client.describe("double")
    assert pools_in_use(server.sessions.info(sid), "reply") == 65536
    del view
    gc.collect()
    client.describe("double")
    assert pools_in_use(server.sessions.info(sid), "reply") == 0


@pytest.mark.gpu
@needs_cuda
def test_server_restart_reopens_the_cuda_session(serve_elsewhere) -> None:
    address, first = serve_elsewhere("cuda")
    model = mlp().cuda()
    with gradserve.connect(address, transport="cuda_ipc") as client:
        old = client.session_info().id
        x = torch.randn(4096, 6, device="cuda", requires_grad=True)   # 96 KiB: not inline
        ct = torch.randn(4096, 4, device="cuda")
        client.torch("mlp")(x).backward(ct)
        first.kill()
        first.communicate(timeout=30)
        serve_elsewhere("cuda", port=int(address.rsplit(":", 1)[1]))
        x.grad = None
        client.torch("mlp")(x).backward(ct)
        assert client.transport == "cuda_ipc" and client.session_info().id != old
        torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-5, atol=1e-5)


# JAX GPU arrays through a torch endpoint: test_shm.py::test_jax_client_through_a_torch_linear


# -- the CUDA IPC transports' logic, on a stand-in for CuPy (runs everywhere) ----------------
UUID = "ab" * 16


@pytest.fixture
def fake_gpu(monkeypatch):
    """Both sides in this process see one 'GPU' whose memory is host memory."""
    from fake_cupy import fake_cupy
    from gradserve.wire import memory

    cp = fake_cupy([UUID])
    monkeypatch.setattr(memory, "cupy_or_none", lambda: cp)
    return cp


def test_a_client_in_the_servers_process_maps_its_pools_without_opening_them(
        monkeypatch, serve) -> None:
    from fake_cupy import fake_cupy
    from gradserve.wire import memory

    cp = fake_cupy([UUID], same_process=True)      # CUDA will not open these handles here
    monkeypatch.setattr(memory, "cupy_or_none", lambda: cp)
    server, client = serve({"double": double}, cuda_pool_bytes=1 << 20)
    assert client.transport == "cuda_ipc" and client.fallback_reason == ""
    assert cp.cuda.runtime.opened == []
    pools = [(r.direction, r.size, r.ready) for r in client.session_info().regions
             if r.kind == "CUDA IPC"]
    assert pools == [("request", 1 << 20, True), ("reply", 1 << 20, True)]
    np.testing.assert_array_equal(client.forward("double", (np.arange(4.0),)).outputs,
                                  2 * np.arange(4.0))


def test_cuda_ipc_session_places_views_and_frees_through_the_pools(fake_gpu, serve) -> None:
    from fake_cupy import device_bytes
    from gradserve.client.session import Session
    from gradserve.client.transports import CudaIpcTransport, ShmTransport

    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      cuda_pool_bytes=1 << 20)
    session, reasons = Session.open(raw(server), [ShmTransport(), CudaIpcTransport()])
    try:
        assert reasons == {} and [t.name for t in session.transports] == ["shm", "cuda_ipc"]
        pools = [(r.direction, r.size, r.device, r.ready) for r in session.info().regions
                 if r.kind == "CUDA IPC"]
        assert pools == [("request", 1 << 20, UUID, True), ("reply", 1 << 20, UUID, True)]
        # both pools were opened once through their handles, and proved by their nonces
        assert len(fake_gpu.cuda.runtime.opened) == 3   # the probe, then each pool once

        payload = bytes(range(256)) * 16
        writer, msg = FrameWriter(slots=session), pb.Tensor()
        writer.put(msg, device_bytes(fake_gpu, payload))
        ref = msg.slot
        assert writer.placed == [ref] and ref.nbytes == len(payload) and ref.generation
        synced = fake_gpu.cuda.runtime.synchronized
        writer.flush()                                   # before the server may look
        assert fake_gpu.cuda.runtime.synchronized == synced + 1
        served = server.sessions.slots(session.state())
        served.check(ref, len(payload), "args[0]")
        seen = served.view(ref)
        assert seen.device == 0 and seen.array.get().tobytes() == payload
        del seen
        session.free([ref])                              # the server is done with it
        assert pools_in_use(session.info(), "request") == 0

        back, allocated = served.place(device_bytes(fake_gpu, payload[::-1]))
        assert allocated and served.transport_of(back.region).region(back.region).direction == pb.REPLY
        session.check(back, len(payload), "outputs")
        view = session.view(back)
        assert view.array.get().tobytes() == payload[::-1]
        assert pools_in_use(server.sessions.info(session.id), "reply") == 4096
        del view                                          # collected: reported with the next call
        state = session.state()
        assert [(r.region, r.offset) for r in state.freed_slots] == [(back.region, back.offset)]
        server.sessions.slots(state)
        assert pools_in_use(server.sessions.info(session.id), "reply") == 0

        slot = session.allocate(4096, 0)                  # already in the request pool
        ref, allocated = session.place(slot)
        assert not allocated and (ref.nbytes, ref.generation) == (4096, 0)
        session.free([ref])                               # not the sender's to free: ignored
        assert pools_in_use(session.info(), "request") == 4096   # the slot lives with `slot`
        del slot
        gc.collect()
        assert pools_in_use(session.info(), "request") == 0
        assert session.place(device_bytes(fake_gpu, b"x" * 64, device=3)) is None   # no pool there
    finally:
        session.close()


def test_each_message_waits_for_its_own_gpu_work(fake_gpu, serve) -> None:
    from fake_cupy import device_bytes
    from gradserve.client.session import Session
    from gradserve.client.transports import CudaIpcTransport, ShmTransport

    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      cuda_pool_bytes=1 << 20)
    session, _ = Session.open(raw(server), [ShmTransport(), CudaIpcTransport()])
    try:
        runtime = fake_gpu.cuda.runtime
        first, second, host = (FrameWriter(slots=session) for _ in range(3))
        first.put(pb.Tensor(), device_bytes(fake_gpu, b"a" * 4096))
        second.put(pb.Tensor(), device_bytes(fake_gpu, b"b" * 4096))
        host.put(pb.Tensor(), memoryview(bytearray(64 << 10)))
        synced = runtime.synchronized
        second.flush()             # waits for its own copy (and, on one stream, the first's)
        first.flush()              # but the first does not count on that: it waits too
        assert runtime.synchronized == synced + 2
        host.flush()               # nothing of it is on a GPU
        first.flush()              # already waited for
        assert runtime.synchronized == synced + 2
        for writer in (first, second, host):
            writer.free_placed()
            assert writer.placed == []
        assert sum(r.used_bytes for r in session.info().regions if r.direction == "request") == 0
    finally:
        session.close()


def test_the_cuda_ipc_transport_is_negotiated_and_named(fake_gpu, serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    with gradserve.connect(server.address, transport="cuda_ipc") as client:
        assert client.transport == "cuda_ipc" and client.fallback_reason == ""
        assert client.session_info().transports == ("shm", "cuda_ipc")
        big = np.ones(65536, np.float32)   # CPU arrays of the same call use shared memory
        np.testing.assert_array_equal(client.forward("double", (big,)).outputs, 2 * big)
    opened, closed = fake_gpu.cuda.runtime.opened, fake_gpu.cuda.runtime.closed
    gc.collect()
    assert sorted(closed) == sorted(opened)             # handles closed with the session


def test_a_pool_whose_nonce_does_not_come_back_ends_the_session(fake_gpu, serve, monkeypatch) -> None:
    from gradserve.client.transports import cuda_ipc as client_cuda

    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    monkeypatch.setattr(client_cuda, "read_nonce", lambda ptr, device: b"\0" * 32)
    with pytest.raises(gradserve.GradserveError, match="cuda_ipc transport cannot work here: "
                                                       "INVALID_ARGUMENT: the nonce of region"):
        gradserve.connect(server.address, transport="cuda_ipc")
    assert server.sessions.count() == 0


def test_a_pool_the_client_cannot_open_is_dropped_not_fatal(fake_gpu, serve, monkeypatch) -> None:
    from gradserve.server.transports import cuda_ipc as server_cuda

    runtime = fake_gpu.cuda.runtime
    opens = runtime.ipcOpenMemHandle

    def export_elsewhere(size, gpu):   # as a server in another process: nothing to map here
        memory = fake_gpu.cuda.Memory(size)
        return memory, runtime.ipcGetMemHandle(memory.ptr)

    def refuse_pools(handle):
        if runtime.opened:   # the probe opened: the pools do not
            raise RuntimeError("cudaErrorInvalidDevice: peer access is not supported")
        return opens(handle)

    monkeypatch.setattr(server_cuda, "export", export_elsewhere)
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    monkeypatch.setattr(runtime, "ipcOpenMemHandle", refuse_pools)
    with gradserve.connect(server.address) as client:
        assert client.transport == "shm"
        assert client.fallback_reason.startswith("cuda_ipc: cannot open the pool on GPU " + UUID)
        info = server.sessions.info(client.session_info().id)
        assert info.transports == ("shm", "cuda_ipc") and not any(
            r.kind == "CUDA IPC" for r in info.regions)   # the server let its pools go


def test_small_replies_in_a_cuda_session_do_not_grow_the_shared_memory(fake_gpu, serve,
                                                                       faulty) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})
    client, channel = faulty(server.address, transport="cuda_ipc")
    for _ in range(3):   # inline by choice: not a sign of full reply regions
        np.testing.assert_array_equal(client.forward("double", (np.ones(3),)).outputs,
                                      2 * np.ones(3))
    assert channel.calls["GrowSession"] == 0
    assert client.session_info().sizes("shared-memory", "reply") == [16 << 20]


def test_pools_larger_than_the_server_allows_are_refused_naming_its_limit(fake_gpu, serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      cuda_pool_bytes=1 << 20, max_cuda_pool_bytes=1 << 20)
    stub = raw(server)
    opened = stub.OpenSession(ask(devices=(UUID,), pool_bytes=2 << 20))
    assert [r.kind for r in opened.regions] == [pb.SHARED_MEMORY]   # opens without pools
    assert [(r.kind, r.reason) for r in opened.refused] == [
        (pb.CUDA_IPC, "CUDA IPC pools of 2097152 bytes asked for; this server allows 4096 to "
                      "1048576")]
    stub.CloseSession(pb.SessionRequest(session_id=opened.session_id))
    opened = stub.OpenSession(ask(devices=(UUID,), pool_bytes=1 << 20))   # at the limit
    assert not opened.refused
    assert sorted(r.kind for r in opened.regions) == [pb.SHARED_MEMORY, pb.CUDA_IPC]
    stub.CloseSession(pb.SessionRequest(session_id=opened.session_id))
    with pytest.raises(gradserve.GradserveError,
                       match="cuda_ipc transport cannot work here: CUDA IPC pools of 2097152 "
                             "bytes asked for; this server allows 4096 to 1048576"):
        gradserve.connect(server.address, transport="cuda_ipc", cuda_pool_bytes=2 << 20)
    with gradserve.connect(server.address, transport="cuda_ipc") as client:   # the default
        assert [(r.direction, r.size) for r in client.session_info().regions
                if r.kind == "CUDA IPC"] == [("request", 1 << 20), ("reply", 1 << 20)]
    assert server.sessions.count() == 0


def test_all_sessions_pools_on_a_gpu_stay_within_its_budget(fake_gpu, serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      cuda_pool_bytes=1 << 20, max_cuda_total_bytes=(2 << 20) + 4096)
    budget = server.sessions.budget
    first = gradserve.connect(server.address)
    try:
        assert first.transport == "cuda_ipc"
        assert budget.used(pb.CUDA_IPC, UUID) == 2 << 20     # its request and reply pools
        with gradserve.connect(server.address) as second:    # no room for two more pools
            assert second.transport == "shm"
            assert second.fallback_reason == (
                f"cuda_ipc: cannot make CUDA IPC pools on GPU {UUID}: this server's CUDA IPC "
                f"budget on GPU {UUID} is spent: 2097152 of 2101248 bytes held, 1048576 more "
                "asked for")
            big = np.ones(65536, np.float32)
            np.testing.assert_array_equal(second.forward("double", (big,)).outputs, 2 * big)
        assert budget.used(pb.CUDA_IPC, UUID) == 2 << 20
    finally:
        first.close()
    wait_until(lambda: budget.used(pb.CUDA_IPC, UUID) == 0, timeout=5)
    with gradserve.connect(server.address) as third:         # the first one's bytes came back
        assert third.transport == "cuda_ipc"
