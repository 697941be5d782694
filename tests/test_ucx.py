"""The UCX transport: bulk data over UCX links, its selection, and its faults.

Needs the ``ucx`` extra (``make test`` installs it where the wheel installs); skipped
with the reason otherwise. In-process tests share one UCX worker between client and
server; the cross-process ones force ``UCX_TLS=tcp`` (as between two nodes), and one runs
the server in its own network namespace where this machine allows it.
"""

from __future__ import annotations

import gc
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.client import replica as replica_module
from gradserve.client.session import Session
from gradserve.client.transports import shm
from gradserve.client.transports.ucx import UcxTransport
from gradserve.server.transports import Refusal
from gradserve.server.transports import ucx as server_ucx
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire import ucx
from helpers import double, free_port, needs_cuda, scrape, wait_serving, wait_until

pytestmark = pytest.mark.skipif(bool(ucx.available()),
                                reason=f"the UCX tests need the ucx extra: {ucx.available()}")

@pytest.fixture(autouse=True)
def no_worker_left():
    """Every test lets go of this process's UCX worker: each link closed, each transport
    that asked for it closed (checked after the servers and clients of the test stopped)."""
    yield
    wait_until(lambda: ucx.Worker.users() == 0, timeout=10,
               message=lambda: f"{ucx.Worker.users()} users of the UCX worker left")
    assert ucx.Pool.held() == 0   # closed links keep no buffers


BIG = ucx.UCX_MIN_BYTES        # the smallest payload that goes over UCX
DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128]


def big(dtype: torch.dtype, nbytes: int = BIG, seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` taking ``nbytes`` (rounded up to whole elements)."""
    gen = torch.Generator().manual_seed(seed)
    n = -(-nbytes // torch.empty((), dtype=dtype).element_size())
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen).bool()
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, (n,), generator=gen
                             ).to(dtype)
    return torch.randn(n, generator=gen, dtype=torch.complex128 if dtype.is_complex
                       else torch.float64).to(dtype)


def identity_and_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.clone(), x.to(torch.float64).sum() if not x.is_complex() else x.sum()


def mixed(tree: dict) -> dict:
    """A pytree function of small and large tensors (the large ones go over UCX)."""
    scale = tree["small"].sum()
    return {"big": tree["big"].tanh() * scale,
            "pair": [tree["big2"] * 3.0, tree["small"] ** 2],
            "count": tree["count"]}


def served(server, client):
    """The server's view of ``client``'s session."""
    return server.sessions.info(client.session_info().id)


def test_every_dtype_moves_over_ucx_exactly_as_over_bytes(serve) -> None:
    server, client = serve({"ident": identity_and_sum}, client_options={"transport": "ucx"})
    assert client.transport == "ucx" and client.fallback_reason == ""
    with gradserve.connect(server.address, transport="grpc") as plain:
        for dtype in DTYPES:
            x = big(dtype)
            over_ucx = client.torch("ident")(x)
            over_bytes = plain.torch("ident")(x)
            for got, want in zip(over_ucx, over_bytes):
                assert got.dtype == want.dtype and torch.equal(got, want), dtype
            assert torch.equal(over_ucx[0], x)
    mine, theirs = client.session_info(), served(server, client)
    assert mine.transports == theirs.transports == ("ucx",)
    # one request payload each way per call: the output copy and the input; sums stay inline
    assert mine.copied == len(DTYPES) and theirs.copied == len(DTYPES)
    assert mine.transfers == 0 and theirs.transfers == 0   # nothing left in flight


def test_a_pytree_of_small_and_large_tensors_differentiates_as_locally(serve) -> None:
    server, client = serve({"mixed": mixed}, client_options={"transport": "ucx"})
    gen = torch.Generator().manual_seed(1)
    leaves = {"big": torch.randn(512, 512, generator=gen, dtype=torch.float64),
              "big2": torch.randn(300, 600, generator=gen, dtype=torch.float64),
              "small": torch.randn(4, generator=gen, dtype=torch.float64)}
    remote = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    local = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    out = client.torch("mixed")({**remote, "count": 7})
    want = mixed({**local, "count": 7})
    assert out["count"] == 7
    cts = [torch.randn_like(t, dtype=torch.float64) for t in
           (want["big"], want["pair"][0], want["pair"][1])]
    torch.autograd.backward([out["big"], out["pair"][0], out["pair"][1]], cts)
    torch.autograd.backward([want["big"], want["pair"][0], want["pair"][1]], cts)
    torch.testing.assert_close(out["big"], want["big"], rtol=0, atol=0)
    for name in leaves:
        torch.testing.assert_close(remote[name].grad, local[name].grad, rtol=1e-12, atol=1e-12)
    # over UCX: big, big2 (request); big, pair[0] (reply); 2 of the 3 cotangents (the third
    # is small) and the gradients of big and big2
    mine, theirs = client.session_info(), served(server, client)
    assert (mine.copied, theirs.copied) == (2 + 2, 2 + 2)
    assert mine.transfers == theirs.transfers == 0


def test_received_buffers_are_reused_within_the_bound(serve, monkeypatch) -> None:
    server, client = serve({"double": double}, client_options={"transport": "ucx"})
    x = np.arange(BIG // 4, dtype=np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
        gc.collect()   # (the server lets go of a large call's arrays in the background)
        # the server's buffer for x and the client's for the output, each kept by its link
        wait_until(lambda: ucx.Pool.held() == 2 * BIG)
    monkeypatch.setattr(ucx, "POOL_BYTES", BIG)   # room for one: the other is dropped
    for _ in range(2):
        np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
        gc.collect()
        wait_until(lambda: ucx.Pool.held() == BIG)
        assert ucx.Pool.held() == BIG


def test_the_load_generator_calls_over_ucx(serve) -> None:
    from gradserve import loadgen
    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      metrics_port=0)
    (level,) = loadgen.run(server.address, "double", concurrency=[2], processes=1,
                           duration=0.5, warmup=0.1, shape=(BIG // 4,), transport="ucx",
                           backward=True)
    assert level.calls > 0 and level.errors == {}, level.error_messages
    moved = {series.split('transport="')[1].split('"')[0]: value
             for series, value in scrape(server.metrics_port).items()
             if series.startswith("gradserve_tensor_bytes_total{") and 'method="Forward"' in series
             and 'direction="in"' in series}
    assert set(moved) == {"ucx"} and moved["ucx"] >= level.calls * BIG   # all in UCX sessions


def test_small_payloads_stay_in_the_grpc_message(serve) -> None:
    server, client = serve({"double": double}, client_options={"transport": "ucx"})
    x = np.arange(BIG // 8 - 1, dtype=np.float64)       # one element short of the threshold
    np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
    assert client.session_info().copied == 0 and served(server, client).copied == 0
    y = np.arange(BIG // 8, dtype=np.float64)
    np.testing.assert_array_equal(client.forward("double", (y,)).outputs, 2 * y)
    assert client.session_info().copied == 1 and served(server, client).copied == 1


def test_auto_takes_ucx_when_the_servers_memory_is_out_of_reach(serve, monkeypatch) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})

    def other_host(name, size):
        raise FileNotFoundError(2, "No such file or directory", name)

    monkeypatch.setattr(shm, "open_region", other_host)
    with gradserve.connect(server.address) as client:
        assert client.transport == "ucx" and client.fallback_reason == ""
        assert [r.transport for r in client.replicas()] == ["ucx"]
        x = np.ones(BIG // 4, np.float32)
        np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
        assert client.session_info().copied == 1
    wait_until(lambda: server.sessions.count() == 0)   # the shm attempt's session too


def test_auto_on_the_same_host_keeps_shared_memory(serve) -> None:
    server, client = serve({"double": double})
    assert client.transport == "shm" and client.session_info().transports == ("shm",)


def test_a_server_not_up_yet_costs_no_ucx_worker() -> None:
    client = gradserve.connect(f"127.0.0.1:{free_port()}", transport="ucx")
    for _ in range(2):   # each attempt asks for the worker and gives it back
        with pytest.raises(gradserve.errors.Unavailable, match="not reachable yet"):
            client.forward("double", (np.ones(3),))
        assert ucx.Worker.users() == 0
        time.sleep(replica_module.RENEGOTIATE_SECONDS)
    client.close()


def test_forced_ucx_fails_at_connect_with_the_reason(serve, monkeypatch) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"})

    def refuse(cls, *args, **kwargs):
        raise Refusal("the server cannot use UCX: ucxx is not installed (pip install "
                      "gradserve[ucx])")

    monkeypatch.setattr(server_ucx.UcxTransport, "create", classmethod(refuse))
    with pytest.raises(gradserve.GradserveError, match=r"the ucx transport cannot work here: "
                                                       r"the server cannot use UCX: ucxx is not"):
        gradserve.connect(server.address, transport="ucx")
    monkeypatch.setattr(UcxTransport, "unavailable", staticmethod(lambda: "no ucxx here"))
    with pytest.raises(gradserve.GradserveError, match="the ucx transport cannot work here: "
                                                       "no ucxx here"):
        gradserve.connect(server.address, transport="ucx")
    assert server.sessions.count() == 0


# -- faults, through a raw session -------------------------------------------------
class RawLink:
    """A UCX session opened by hand, to send requests whose transfers misbehave."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.GradserveStub(self.channel)
        session, reasons = Session.open(self.stub, [UcxTransport()])
        assert session is not None, reasons
        self.session = session
        (region,) = session.transports[0].regions
        self.index, self.link = region.index, region.memory

    def request(self, nbytes: int, tag: int, **overrides) -> pb.ForwardRequest:
        """A Forward of ``double`` whose one argument (``nbytes`` of float32) is a transfer."""
        request = pb.ForwardRequest(endpoint="double",
                                    session=pb.SessionState(id=self.session.id))
        tensor = request.args.tuple_value.items.add().tensor
        tensor.dtype, tensor.shape[:] = pb.FLOAT32, [nbytes // 4]
        tensor.transfer.CopyFrom(pb.Transfer(region=self.index, tag=tag, **overrides))
        return request

    def close(self) -> None:
        self.session.close()
        self.channel.close()


@pytest.fixture
def raw_link(serve):
    """(server, RawLink) with a 1-second transfer timeout."""
    made = []

    def start(**options):
        server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                          transfer_timeout=1.0, **options)
        link = RawLink(server.address)
        made.append(link)
        return server, link

    yield start
    for link in made:
        link.close()


def forward(link: RawLink, request: pb.ForwardRequest) -> grpc.RpcError:
    """Send ``request`` streaming; the error it fails with."""
    with pytest.raises(grpc.RpcError) as failed:
        list(link.stub.Forward(iter([pb.ForwardFrame(header=request)]), timeout=30))
    return failed.value


def test_a_payload_that_never_comes_is_cancelled_after_the_timeout(raw_link) -> None:
    server, link = raw_link()
    start = time.monotonic()
    late = link.link.next_tag()
    err = forward(link, link.request(BIG, late))
    assert err.code() == grpc.StatusCode.CANCELLED
    assert "did not complete within the transfer timeout" in err.details()
    assert 1.0 <= time.monotonic() - start < 10
    assert server.sessions.info(link.session.id).transfers == 0   # the call let go of it
    # the payload comes after all: it lands in memory the server kept for it, not freed
    straggler = link.link.send(memoryview(np.ones(BIG // 4, np.float32)).cast("B"), late)
    straggler.wait(time.monotonic() + 10)
    x = np.arange(BIG // 4, dtype=np.float32)   # and the link still works
    tag = link.link.next_tag()
    sent = link.link.send(memoryview(x).cast("B"), tag)
    replies = link.stub.Forward(iter([pb.ForwardFrame(header=link.request(BIG, tag))]),
                                timeout=30)
    output = next(replies).header.outputs.tensor
    assert output.WhichOneof("payload") == "transfer" and list(output.shape) == [BIG // 4]
    got = link.link.receive(BIG, False, output.transfer.tag).wait(time.monotonic() + 5)
    assert list(replies) == []   # the reply ends once its payload was taken
    np.testing.assert_array_equal(np.frombuffer(got, np.float32), 2 * x)
    sent.wait(time.monotonic() + 5)


def test_a_cancelled_call_stops_waiting_for_its_payload(serve) -> None:
    server, _ = serve({"double": double}, client_options={"transport": "grpc"},
                      transfer_timeout=120.0)
    link = RawLink(server.address)
    try:
        request = link.request(BIG, link.link.next_tag())
        with pytest.raises(grpc.RpcError) as failed:   # the client gives up after 0.5 s
            list(link.stub.Forward(iter([pb.ForwardFrame(header=request)]), timeout=0.5))
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the server drops the receive then, not after its 120 s timeout
        wait_until(lambda: server.sessions.info(link.session.id).transfers == 0, timeout=10)
    finally:
        link.close()


def test_more_bytes_than_announced_are_refused(raw_link) -> None:
    server, link = raw_link()
    tag = link.link.next_tag()
    sent = link.link.send(memoryview(np.ones(BIG // 2, np.float32)).cast("B"), tag)  # 2x
    err = forward(link, link.request(BIG, tag))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the peer sent more than the {BIG} bytes dtype x shape needs" in err.details()
    wait_until(lambda: sent.request.completed, timeout=10)   # the sender is not left hanging
    assert server.sessions.info(link.session.id).transfers == 0


@pytest.mark.parametrize("case, message", [
    ("other link", "is not one the client of UCX link"),
    ("server side", "is not one the client of UCX link"),
    ("proof tag", "is the link's proof, not a payload's"),
    ("no such link", "link 7 is not in use in this session"),
])
def test_a_transfer_the_client_may_not_name_is_refused(raw_link, case, message) -> None:
    server, link = raw_link()
    tag, index = link.link.next_tag(), link.index
    if case == "other link":
        tag ^= 1 << 40
    elif case == "server side":
        tag = ucx.tag(link.link.id, ucx.SERVER, 5)
    elif case == "proof tag":
        tag = ucx.tag(link.link.id, ucx.CLIENT, 0)
    else:
        index = 7
    request = link.request(BIG, tag)
    request.args.tuple_value.items[0].tensor.transfer.region = index
    err = forward(link, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details()
    assert server.sessions.info(link.session.id).transfers == 0


def test_a_tag_named_twice_and_a_transfer_without_session_are_refused(raw_link) -> None:
    server, link = raw_link()
    tag = link.link.next_tag()
    request = link.request(BIG, tag)
    request.args.tuple_value.items.add().CopyFrom(request.args.tuple_value.items[0])
    err = forward(link, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"args[1]: tag {tag:#x} is already being received" in err.details()
    request = link.request(BIG, link.link.next_tag())
    request.ClearField("session")
    err = forward(link, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a transfer needs a session with a link" in err.details()
    assert server.sessions.info(link.session.id).transfers == 0


def test_a_huge_announced_transfer_is_refused_before_anything_is_allocated(raw_link) -> None:
    server, link = raw_link(max_request_bytes=64 << 20)
    err = forward(link, link.request(1 << 40, link.link.next_tag()))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit of 67108864" in err.details()
    assert server.sessions.info(link.session.id).transfers == 0


def test_a_client_that_dies_mid_transfer_fails_only_its_call(serve) -> None:
    server, client = serve({"double": double}, transfer_timeout=120.0)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_ucx import RawLink, BIG
        from gradserve.v1 import gradserve_pb2 as pb
        link = RawLink({server.address!r})
        replies = link.stub.Forward(iter([pb.ForwardFrame(
            header=link.request(BIG, link.link.next_tag()))]))
        print("session", link.session.id, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        sid = next(line for line in proc.stdout if line.startswith("session ")).split()[1]
        wait_until(lambda: server.sessions.info(sid).transfers == 1, timeout=30)
        proc.kill()
        proc.wait(timeout=30)
        # UCX's error handling ends it, not the server's 120 s timeout
        wait_until(lambda: server.sessions.info(sid).transfers == 0, timeout=30)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    x = np.ones(BIG // 4, np.float32)   # the server goes on serving
    np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)


def test_a_link_the_server_finds_broken_fails_that_call_then_calls_send_bytes(
        serve, monkeypatch) -> None:
    server, client = serve({"double": double}, client_options={"transport": "ucx"})
    monkeypatch.setattr(replica_module, "RELINK_SECONDS", 0.5)
    x = np.ones(BIG // 4, np.float32)
    np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
    receive = ucx.Link.receive

    def reset_on_the_server(self, nbytes, device, at):
        if self.side == ucx.SERVER:
            self.broke("UCXConnectionResetError: injected")
            raise gradserve.errors.StatusError(grpc.StatusCode.UNAVAILABLE, "link reset",
                                               gradserve.errors.LINK_BROKEN)
        return receive(self, nbytes, device, at)

    monkeypatch.setattr(ucx.Link, "receive", reset_on_the_server)
    with pytest.raises(gradserve.errors.Unavailable) as failed:
        client.forward("double", (x,))
    assert failed.value.reason == gradserve.errors.LINK_BROKEN
    assert client.transport == "grpc"            # the session's link is broken: bytes
    copied = client.session_info().copied
    np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
    assert client.session_info().copied == copied   # that call sent bytes
    monkeypatch.setattr(ucx.Link, "receive", receive)
    time.sleep(0.6)                               # then a new session sets up a new link
    np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
    assert client.transport == "ucx" and client.session_info().copied == 1
    wait_until(lambda: server.sessions.count() == 1)   # the old session was closed


def test_across_processes_over_tcp(serve_elsewhere) -> None:
    address, _ = serve_elsewhere("table", env={"UCX_TLS": "tcp"})
    with gradserve.connect(address, transport="ucx") as client:
        x = torch.randn(1 << 19, dtype=torch.float32, requires_grad=True)   # 2 MiB
        y = client.torch("square")(x)
        torch.testing.assert_close(y, x * x, rtol=0, atol=0)
        ct = torch.randn_like(x)
        y.backward(ct)
        torch.testing.assert_close(x.grad, 2 * x.detach() * ct, rtol=0, atol=0)
        assert client.transport == "ucx" and client.session_info().copied == 2


@pytest.mark.gpu
@needs_cuda
def test_cuda_tensors_go_device_to_device_over_ucx(serve_elsewhere) -> None:
    address, _ = serve_elsewhere("cuda", env={"UCX_TLS": "tcp,cuda_copy,cuda_ipc"})
    with gradserve.connect(address, transport="ucx") as client:
        x = torch.randn(1 << 22, device="cuda", requires_grad=True)    # 16 MiB
        ct = torch.randn_like(x)
        y = client.torch("double")(x)
        assert y.is_cuda and torch.equal(y, 2 * x)
        y.backward(ct)
        assert x.grad.is_cuda and torch.equal(x.grad, 2 * ct)
        info = client.session_info()
        assert client.transport == "ucx" and info.copied == 2 and info.transfers == 0


def _netns_missing() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    name = f"gsprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


@pytest.mark.slow
def test_a_server_in_another_network_namespace_over_a_veth_pair(tmp_path) -> None:
    why = _netns_missing()
    if why:
        pytest.skip(f"the network-namespace test {why}")
    ns, tag = f"gs{secrets.token_hex(3)}", secrets.randbelow(200) + 20
    outside, inside = f"gsa{tag}", f"gsb{tag}"
    here, there = f"10.231.{tag}.1", f"10.231.{tag}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    server = None
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", ns)
        ip("addr", "add", f"{here}/24", "dev", outside)
        ip("link", "set", outside, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{there}/24", "dev", inside)
        ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        port = free_port()
        env = {**os.environ, "UCX_NET_DEVICES": inside, "UCX_TLS": "tcp"}
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "gradserve.server.cli", "serve",
             f"{os.path.dirname(__file__)}/cli_targets.py:table", "--host", there,
             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        wait_serving(f"{there}:{port}").close()
        # the client in its own process: its UCX worker uses only the veth device
        script = textwrap.dedent(f"""
            import torch, gradserve
            with gradserve.connect("{there}:{port}", transport="ucx") as client:
                x = torch.randn(1 << 19, requires_grad=True)
                y = client.torch("square")(x)
                y.backward(torch.ones_like(x))
                assert torch.equal(y, x * x) and torch.equal(x.grad, 2 * x.detach())
                print(client.transport, client.session_info().copied)
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "UCX_NET_DEVICES": outside,
                                               "UCX_TLS": "tcp"})
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split() == ["ucx", "2"]
    finally:
        if server is not None:
            server.kill()
            server.communicate(timeout=30)
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
