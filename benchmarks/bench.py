"""Forward+vjp latency of a layer served by gradserve, against local torch and a bare gRPC echo.

The workload is one 256-wide layer ``y = tanh(x @ W)`` (float32): ``x`` of
shape ``(rows, 256)`` requires grad, ``W`` is fixed on the server. One *step*
is a forward plus ``y.backward(ct)`` with a fixed random cotangent ``ct``
(from JAX: ``y, pull = jax.vjp(f, x); pull(ct)``).

The same torch-served endpoint is called from the torch client and from the
JAX client (eager and under ``jax.jit``). A JAX step makes two
``jax.pure_callback`` round trips (forward, vjp), so the cost of one callback
with an empty body is measured too, to be subtracted by the reader.

Each way of running a step is a *path* (``PATHS``): a context manager that
owns its long-lived resources (servers, channels) and yields a function that
builds the step for a given workload. The printed tables are described by
``TABLES`` of ``Column``s. A new transport or client is one more path and a few
more columns.

The torch client is measured over both of gradserve's transports: "gradserve"
(``transport="grpc"``: tensor bytes in the gRPC stream) and "shm"
(``transport="shm"``: tensors through shared-memory arenas, inputs copied in) and
"shm_arena" (the same, with x and ct allocated in the arena by ``client.as_shared``:
nothing is copied on the way up), next to "memcpy", one single-threaded copy of
the bytes a step moves. The JAX paths use the gRPC
transport. The shared-memory table also runs a larger row count (``--shm-rows``)
that only its paths are measured at.

With the ``ucx`` extra, a last table runs the torch client against servers in another
process: bytes in the gRPC stream, UCX over TCP (the server's ``UCX_TLS=tcp``), UCX
with its shared-memory transports allowed, and gradserve's shared memory, next to a raw
TCP socket round trip of the same bytes to another process (``--ucx-rows``).

Every step is timed in one process on a shared machine, with client and
servers competing for the same cores and GIL, so absolute milliseconds are
noisy; the ratios are the meaningful numbers. Paths are sampled in
interleaved rounds so that slow drifts in machine load hit all of them alike.

Run with ``make bench`` or
``python benchmarks/bench.py [--quick] [--rows 16,4096] [--shm-rows 16,262144]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import sys
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import grpc
import numpy as np
import torch

import gradserve
from gradserve.server import Server
from gradserve.wire.framing import DEFAULT_CHUNK_BYTES as CHUNK_BYTES

WIDTH = 256
DEFAULT_ROWS = (16, 4096, 65536)
#: Row counts of the shared-memory table; 262144 rows = 256 MiB per tensor, 1 GiB moved per step.
DEFAULT_SHM_ROWS = (16, 4096, 65536, 262144)
#: Largest difference allowed between a path's result and the local one, relative to the
#: largest magnitude in the local result (absolute where that is below 1).
TOLERANCE = 1e-5
MiB = float(1 << 20)
ECHO_METHOD = "/bench.Echo/Echo"

#: One forward+vjp; returns ``(y, x.grad)`` when the path computes them, else None. JAX paths
#: return ``jax.Array``s, compared after the timing (``_as_torch``) so that no step pays a copy.
Step = Callable[[], "tuple[Any, Any] | None"]


class Layer(torch.nn.Module):
    """``y = tanh(x @ W)`` with a fixed ``W`` of shape (256, 256)."""

    def __init__(self, width: int = WIDTH, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(width, width, generator=g) / width ** 0.5,
                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight)


@dataclass(frozen=True)
class Workload:
    """The inputs of one table row."""

    rows: int
    x: torch.Tensor   # (rows, WIDTH), requires grad
    ct: torch.Tensor  # (rows, WIDTH) cotangent of y

    @classmethod
    def make(cls, rows: int, seed: int = 1) -> "Workload":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, WIDTH, generator=g).requires_grad_(True)
        return cls(rows, x, torch.randn(rows, WIDTH, generator=g))

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one (rows, WIDTH) float32 tensor: x, y, ct and the grad are all this size."""
        return self.x.numel() * self.x.element_size()


def autograd_step(fn: Callable[[torch.Tensor], torch.Tensor], work: Workload) -> Step:
    """A step that runs ``fn`` under autograd and backpropagates ``work.ct`` into ``work.x``."""
    def step() -> tuple[torch.Tensor, torch.Tensor]:
        work.x.grad = None
        y = fn(work.x)
        y.backward(work.ct)
        assert work.x.grad is not None
        return y.detach(), work.x.grad
    return step


def hvp_step(fn: Callable[[torch.Tensor], torch.Tensor], work: Workload) -> Step:
    """A step computing the Hessian-vector product ``H v`` of ``sum(fn(x) * ct)`` in ``x``
    at ``v = ct`` by double backward (the first gradient kept with ``create_graph``)."""
    x = work.x.detach().clone().requires_grad_(True)

    def step() -> torch.Tensor:
        (g,) = torch.autograd.grad((fn(x) * work.ct).sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad((g * work.ct).sum(), x)
        return hv
    return step


# -- paths ------------------------------------------------------------------
MakeStep = Callable[[Workload], Step]
Path = Callable[[torch.nn.Module], ContextManager[MakeStep]]


@contextlib.contextmanager
def local_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """In-process torch: the baseline."""
    yield lambda work: autograd_step(module, work)


@contextlib.contextmanager
def _served(module: torch.nn.Module, transport: str = "grpc",
            **options: Any) -> Iterator[gradserve.Client]:
    """A client of an in-process gradserve server serving ``module`` as "layer".

    The client uses ``transport`` ("grpc" unless told: the bytes path, whatever
    "auto" would pick on this host) and fails if it got another. Every client
    path gets its own server and channel, set up alike.
    """
    server = Server(host="127.0.0.1", port=0, workers=4)
    server.add_torch("layer", module)
    server.start()
    try:
        with _client(server.address, transport, **options) as client:
            yield client
    finally:
        server.stop()


@contextlib.contextmanager
def _served_elsewhere(target: str, transport: str,
                      env: Mapping[str, str] = {}) -> Iterator[gradserve.Client]:
    """As ``_served``, the server being another process (``gradserve serve`` of ``target``
    in this file, ``env`` added to its environment): torch cannot run a CUDA backward that
    calls a server in its own process, and a UCX link is between two processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "gradserve.server.cli", "serve",
                             f"{os.path.abspath(__file__)}:{target}", "--port",
                             address.rsplit(":", 1)[1], "--workers", "4"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        with grpc.insecure_channel(address) as channel:
            ready = grpc.channel_ready_future(channel)
            deadline = time.monotonic() + 120
            while not ready.done():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"bench: no server on {address}:\n{log.read()}")
                time.sleep(0.1)
        with _client(address, transport) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def _client(address: str, transport: str, **options: Any) -> Iterator[gradserve.Client]:
    """A client of ``address`` that fails unless it got ``transport``."""
    client = gradserve.connect(address, transport=transport, **options)
    try:
        if client.transport != transport:
            raise RuntimeError(f"bench: asked for the {transport} transport, got "
                               f"{client.transport} ({client.fallback_reason})")
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def gradserve_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """``client.torch(...)`` against an in-process gradserve server, bytes in the gRPC stream."""
    with _served(module, transport="grpc") as client:
        f = client.torch("layer")
        yield lambda work: autograd_step(f, work)


@contextlib.contextmanager
def local_hvp_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """In-process torch: a Hessian-vector product (the HVP table's baseline)."""
    yield lambda work: _unchecked(hvp_step(module, work))


@contextlib.contextmanager
def hvp_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """The same Hessian-vector product through ``client.torch(...)`` (bytes in the gRPC
    stream): a Forward, a kept Vjp and the Vjp of that Vjp per step, checked against
    local torch once per row."""
    with _served(module, transport="grpc") as client:
        f = client.torch("layer")

        def make(work: Workload) -> Step:
            remote, local = hvp_step(f, work)(), hvp_step(module, work)()
            err = (remote - local).abs().max().item() / max(1.0, local.abs().max().item())
            if not err <= TOLERANCE:
                sys.exit(f"bench: hvp differs from local at rows={work.rows}: {err:.3g}")
            return _unchecked(hvp_step(f, work))
        yield make


def _unchecked(step: Step) -> Step:
    """``step``, its result dropped: ``check`` compares (y, grad) pairs, not HVPs."""
    def run() -> None:
        step()
    return run


@contextlib.contextmanager
def shm_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """``client.torch(...)`` over the shared-memory transport (the arenas grow in the warm-up)."""
    with _served(module, transport="shm") as client:
        f = client.torch("layer")
        yield lambda work: autograd_step(f, work)


@contextlib.contextmanager
def shm_arena_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """As ``shm_path``, with x and ct living in the request arena (``client.as_shared``)."""
    with _served(module, transport="shm") as client:
        f = client.torch("layer")

        def make(work: Workload) -> Step:
            shared = Workload(work.rows, client.as_shared(work.x.detach()).requires_grad_(True),
                              client.as_shared(work.ct))
            return autograd_step(f, shared)
        yield make


@contextlib.contextmanager
def memcpy_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """One memcpy of the bytes a step moves: x and ct up, y and the grad down.

    Four ``np.copyto`` calls (one thread, as the transports copy) from four
    distinct sources into four preallocated destinations, all touched before
    timing so that no page faults are counted. No server, no compute.
    """
    def make(work: Workload) -> Step:
        x = work.x.detach().numpy()
        sources = [x, work.ct.numpy(), np.tanh(x), -x]   # stand-ins for y and the grad
        targets = [np.ones_like(a) for a in sources]

        def step() -> None:
            for target, source in zip(targets, sources):
                np.copyto(target, source)
        return step
    yield make


# -- CUDA paths: only where torch sees a GPU and CuPy is there for CUDA IPC --------
def _gpu_step(step: Step) -> Step:
    """``step`` followed by a device synchronisation, so its GPU work is timed too."""
    def synced() -> Any:
        result = step()
        torch.cuda.synchronize()
        return result
    return synced


@contextlib.contextmanager
def local_cuda_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """In-process torch on the GPU: the CUDA table's baseline."""
    gpu = copy.deepcopy(module).cuda()
    yield lambda work: _gpu_step(autograd_step(gpu, _cuda_workload(work)))


@contextlib.contextmanager
def cuda_ipc_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """``client.torch(...)`` over CUDA IPC to a server with the layer on the GPU; x and ct
    are allocated in the request pool (``client.as_shared``)."""
    with _served_elsewhere("cuda_layer", "cuda_ipc") as client:
        f = client.torch("layer")

        def make(work: Workload) -> Step:
            gpu = _cuda_workload(work)
            shared = Workload(work.rows, client.as_shared(gpu.x.detach()).requires_grad_(True),
                              client.as_shared(gpu.ct))
            return _gpu_step(autograd_step(f, shared))
        yield make


def cuda_layer() -> dict[str, torch.nn.Module]:
    """The default ``Layer`` on the GPU, as ``gradserve serve bench.py:cuda_layer`` serves it."""
    return {"layer": Layer().cuda()}


@contextlib.contextmanager
def memcpy_cuda_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """Device-to-device copies of the 4 tensors a step moves, into warm buffers."""
    def make(work: Workload) -> Step:
        sources = [t.cuda() for t in (work.x.detach(), work.ct, work.x.detach(), work.ct)]
        targets = [torch.empty_like(t) for t in sources]

        def step() -> None:
            for target, source in zip(targets, sources):
                target.copy_(source)
            torch.cuda.synchronize()
        return step
    yield make


def _cuda_workload(work: Workload) -> Workload:
    return Workload(work.rows, work.x.detach().cuda().requires_grad_(True), work.ct.cuda())


def _cuda_ipc_usable() -> bool:
    from gradserve.client.transports import cuda_ipc
    return torch.cuda.is_available() and not cuda_ipc.unavailable()


# -- UCX paths: the server in another process, as across nodes -------------------------
#: Both sides of "ucx_shm" may use UCX's shared-memory transports despite endpoint error
#: handling (set here before this process's UCX worker exists; "ucx_tcp"'s server allows
#: only TCP, so that link stays TCP).
UCX_SHM_ENV = {"UCX_POSIX_ERROR_HANDLING": "y", "UCX_SYSV_ERROR_HANDLING": "y"}


def layer() -> dict[str, torch.nn.Module]:
    """The default ``Layer`` on the CPU, as ``gradserve serve bench.py:layer`` serves it."""
    return {"layer": Layer()}


def _elsewhere_path(transport: str, env: Mapping[str, str] = {}) -> Path:
    """``client.torch(...)`` over ``transport`` to a server in another process."""
    @contextlib.contextmanager
    def path(module: torch.nn.Module) -> Iterator[MakeStep]:
        with _served_elsewhere("layer", transport, env) as client:
            f = client.torch("layer")
            yield lambda work: autograd_step(f, work)
    return path


_ECHO_SERVER = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray()
while True:
    head = conn.recv(8, socket.MSG_WAITALL)
    if len(head) < 8:
        break
    n = int.from_bytes(head, "little")
    if len(buf) < n:
        buf = bytearray(n)
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        got += conn.recv_into(view[got:], n - got)
    conn.sendall(view)
"""


@contextlib.contextmanager
def raw_tcp_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """A raw TCP socket round trip of the bytes a step moves, to another process: x up and
    back, ct up and back (the floor of a step to another node over TCP). No compute."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        def make(work: Workload) -> Step:
            payloads = [memoryview(t.numpy()).cast("B") for t in (work.x.detach(), work.ct)]
            back = bytearray(max(p.nbytes for p in payloads))

            def step() -> None:
                for payload in payloads:
                    conn.sendall(payload.nbytes.to_bytes(8, "little"))
                    conn.sendall(payload)
                    view, got = memoryview(back)[:payload.nbytes], 0
                    while got < payload.nbytes:
                        got += conn.recv_into(view[got:], payload.nbytes - got)
            return step
        yield make
    finally:
        conn.close()
        proc.wait(timeout=30)


def _ucx_usable() -> bool:
    from gradserve.wire import ucx
    return not ucx.available()


# JAX is imported only by the JAX paths (when they are entered), not at module import.
def _jax_inputs(work: Workload) -> tuple[Any, Any]:
    """``work``'s ``x`` and ``ct`` as float32 ``jax.Array``s, made once outside the step."""
    import jax.numpy as jnp
    return jnp.asarray(work.x.detach().numpy()), jnp.asarray(work.ct.numpy())


def _jitted_vjp_step(f: Callable[[Any], Any], work: Workload) -> Step:
    """A step running ``jax.jit`` of ``f``'s forward and vjp at ``work.ct``; returns ``(y, grad)``."""
    import jax

    @jax.jit
    def forward_vjp(x: Any, ct: Any) -> tuple[Any, Any]:
        y, pull = jax.vjp(f, x)
        return y, pull(ct)[0]

    x, ct = _jax_inputs(work)

    def step() -> tuple[Any, Any]:
        return jax.block_until_ready(forward_vjp(x, ct))
    return step


@contextlib.contextmanager
def local_jax_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """In-process JAX, jitted: ``jnp.tanh(x @ W)`` with the module's ``W``, the JAX baseline."""
    import jax.numpy as jnp
    weight = jnp.asarray(module.weight.detach().numpy())
    # full float32 products: JAX on a GPU multiplies float32 in TF32 by default
    yield lambda work: _jitted_vjp_step(
        lambda x: jnp.tanh(jnp.matmul(x, weight, precision="highest")), work)


@contextlib.contextmanager
def jax_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """``client.jax(...)`` called eagerly: ``y, pull = jax.vjp(f, x); pull(ct)`` per step."""
    import jax
    with _served(module, transport="grpc") as client:
        f = client.jax("layer")

        def make(work: Workload) -> Step:
            x, ct = _jax_inputs(work)

            def step() -> tuple[Any, Any]:
                y, pull = jax.vjp(f, x)
                (grad,) = pull(ct)
                return jax.block_until_ready((y, grad))
            return step
        yield make


@contextlib.contextmanager
def jax_jit_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """``client.jax(...)`` under ``jax.jit`` (compiled by the check, before any timing)."""
    with _served(module, transport="grpc") as client:
        f = client.jax("layer")
        yield lambda work: _jitted_vjp_step(f, work)


@contextlib.contextmanager
def jax_hvp_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """The HVP table's product through ``client.jax(...)`` under ``jax.jit``, forward over
    reverse (``jax.jvp`` of ``jax.grad``: a Forward, a kept Vjp and a Vjp of it along the
    direction), checked against local torch once per row."""
    import jax
    import jax.numpy as jnp
    with _served(module, transport="grpc") as client:
        f = client.jax("layer")

        def make(work: Workload) -> Step:
            x, ct = _jax_inputs(work)

            @jax.jit
            def hvp(x: Any, ct: Any) -> Any:
                return jax.jvp(jax.grad(lambda v: jnp.sum(f(v) * ct)), (x,), (ct,))[1]

            def step() -> Any:
                return jax.block_until_ready(hvp(x, ct))
            local = hvp_step(module, work)().detach().numpy()
            scale = max(1.0, float(np.abs(local).max()))
            err = float(np.abs(np.asarray(step()) - local).max()) / scale
            if not err <= TOLERANCE:
                sys.exit(f"bench: jax hvp differs from local at rows={work.rows}: {err:.3g}")
            return _unchecked(step)
        yield make


def _empty_body(x: np.ndarray) -> np.ndarray:
    """The host side of the callback paths: hands its input straight back."""
    return x


def _callback_path(jit: bool) -> Path:
    @contextlib.contextmanager
    def path(module: torch.nn.Module) -> Iterator[MakeStep]:
        import jax

        def call(x: Any) -> Any:
            # One function object for every call: eager pure_callback is cached on the callable,
            # and a fresh lambda per call would recompile every time (~10 ms).
            return jax.pure_callback(_empty_body, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

        def make(work: Workload) -> Step:
            x, _ = _jax_inputs(work)
            run = jax.jit(call) if jit else call

            def step() -> None:
                jax.block_until_ready(run(x))
            return step
        yield make
    path.__doc__ = (f"One ``jax.pure_callback`` round trip of ``x`` with an empty body"
                    f"{', under jax.jit' if jit else ', eager'}: no server, no compute.")
    return path


def _chunks(data: bytes | memoryview) -> Iterator[bytes]:
    for offset in range(0, len(data), CHUNK_BYTES):
        yield bytes(data[offset:offset + CHUNK_BYTES])


def _echo_handler(request_iterator: Iterator[bytes],
                  context: grpc.ServicerContext) -> Iterator[bytes]:
    # Reassemble the whole message before replying, as gradserve must before it computes.
    yield from _chunks(b"".join(request_iterator))


@contextlib.contextmanager
def echo_path(module: torch.nn.Module) -> Iterator[MakeStep]:
    """A bare gRPC echo moving the same bytes as a gradserve step, with no protobuf and no compute.

    It is a stream-stream method chunked like gradserve's bytes transport
    (1 MiB; rather than one unary message), so it pays the same per-message
    costs and neither side needs raised message-size limits. Raw bytes pass
    through (no serializers). One step is two round trips: x's bytes up and
    back (forward), then ct's bytes up and back (vjp: the grad is ct-sized).
    Each side joins the chunks it receives, as gradserve reassembles tensors.
    """
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.stream_stream_rpc_method_handler(_echo_handler),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        echo = channel.stream_stream(ECHO_METHOD)

        def make(work: Workload) -> Step:
            x_bytes = memoryview(work.x.detach().numpy()).cast("B")
            ct_bytes = memoryview(work.ct.numpy()).cast("B")

            def step() -> None:
                for payload in (x_bytes, ct_bytes):
                    back = b"".join(echo(_chunks(payload)))
                    if len(back) != len(payload):
                        raise RuntimeError(f"echo returned {len(back)} of {len(payload)} bytes")
            return step
        yield make
    finally:
        channel.close()
        server.stop(None).wait()


#: name -> path; "local" is the reference every other path's results are checked against.
PATHS: dict[str, Path] = {
    "local": local_path,
    "gradserve": gradserve_path,
    "shm": shm_path,
    "shm_arena": shm_arena_path,
    "memcpy": memcpy_path,
    "echo": echo_path,
    "local_jax": local_jax_path,
    "jax": jax_path,
    "jax_jit": jax_jit_path,
    "callback": _callback_path(jit=False),
    "callback_jit": _callback_path(jit=True),
    "local_hvp": local_hvp_path,
    "hvp": hvp_path,
    "jax_hvp": jax_hvp_path,
}
UCX = _ucx_usable()
if UCX:
    for key, value in UCX_SHM_ENV.items():
        os.environ.setdefault(key, value)
    PATHS.update(bytes_x=_elsewhere_path("grpc"), shm_x=_elsewhere_path("shm"),
                 ucx_tcp=_elsewhere_path("ucx", {"UCX_TLS": "tcp"}),
                 ucx_shm=_elsewhere_path("ucx", UCX_SHM_ENV), raw_tcp=raw_tcp_path)
CUDA = _cuda_ipc_usable()
if CUDA:
    PATHS.update(local_cuda=local_cuda_path, cuda_ipc=cuda_ipc_path, memcpy_cuda=memcpy_cuda_path)
REFERENCE = "local"


# -- measuring ----------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """How long to sample each cell."""

    seconds: float    # target sampling time per path per row
    rounds: int       # interleaved rounds (and so the minimum number of samples)
    warmup_s: float   # warm-up time per path per row (at least one call)
    big: Budget | None = None   # used instead for tensors of at least ``BIG_BYTES``
    spread: bool = False  # spread each step's samples over its round (see ``measure``)


#: For tensors of ``BIG_BYTES`` and more (a bytes step at 262144 rows takes seconds) the
#: budgets have few rounds, but time enough that the sub-second paths get several samples.
BIG_BYTES = 128 << 20
FULL = Budget(seconds=2.0, rounds=7, warmup_s=0.3,
              big=Budget(seconds=8.0, rounds=5, warmup_s=0, spread=True))
QUICK = Budget(seconds=0.3, rounds=3, warmup_s=0.05,
               big=Budget(seconds=1.0, rounds=2, warmup_s=0, spread=True))
#: After each path's samples in a round, wait this fraction of its step time (at most
#: ``SETTLE_MAX_S``): a served step returns before its server thread has finished (freeing
#: the request's buffers and the dropped residual), and that tail must not land in the next
#: path's samples (it adds ~40 ms to whatever follows a bytes step at 262144 rows).
SETTLE_FRACTION = 0.1
SETTLE_MAX_S = 0.5


def budget_for(work: Workload, budget: Budget) -> Budget:
    """``budget``, or its ``big`` budget for big workloads."""
    return budget.big if budget.big is not None and work.tensor_bytes >= BIG_BYTES else budget


def _time(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(steps: Mapping[str, Step], budget: Budget) -> dict[str, float]:
    """Median seconds per call of each step.

    Each step is warmed up, then sampled in ``budget.rounds`` interleaved
    rounds; in every round each step runs as many times as fit in its share of
    ``budget.seconds`` (at least once), so all steps get the same wall time
    whatever their speed and see the same machine load. With ``budget.spread``
    each step's samples in a round are spread evenly among the others' (local,
    shm, local, bytes, shm, local, ...) rather than run back to back, so that a
    burst of machine load (page-fault time swings by 2x at 256 MiB tensors)
    hits neighbouring samples of every step alike; for small workloads, where
    back-to-back runs keep caches warm, it is off. After every run of a step
    the machine settles (``SETTLE_FRACTION``).
    """
    estimate: dict[str, float] = {}

    def settle(name: str) -> None:
        time.sleep(min(SETTLE_MAX_S, SETTLE_FRACTION * estimate[name]))

    for name, step in steps.items():
        warm = [_time(step)]
        while sum(warm) < budget.warmup_s:
            warm.append(_time(step))
        estimate[name] = min(warm)
        settle(name)
    per_round = budget.seconds / budget.rounds
    reps = {name: max(1, round(per_round / max(t, 1e-9))) for name, t in estimate.items()}
    if budget.spread:   # the i-th of n samples sits at (i + 0.5) / n of the round
        order = sorted(((i + 0.5) / n, k, name) for k, (name, n) in enumerate(reps.items())
                       for i in range(n))
        schedule = [(name, 1) for _, _, name in order]
    else:
        schedule = list(reps.items())
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(budget.rounds):
        for name, n in schedule:
            samples[name].extend(_time(steps[name]) for _ in range(n))
            settle(name)
    return {name: statistics.median(times) for name, times in samples.items()}


def _as_torch(value: Any) -> torch.Tensor:
    """A step's result as a CPU torch tensor (JAX paths return ``jax.Array``s)."""
    return value.cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))


def check(work: Workload, steps: Mapping[str, Step]) -> None:
    """Abort unless every path's output and gradient match the reference path's.

    Running every step once here also compiles the jitted paths before any timing.
    """
    expected = steps[REFERENCE]()
    assert expected is not None
    for name, step in steps.items():
        got = step()
        if name == REFERENCE or got is None:
            continue
        for what, want, have in zip(("output", "grad"), expected, map(_as_torch, got)):
            where = f"bench: {name} {what} differs from {REFERENCE} at rows={work.rows}"
            if tuple(have.shape) != tuple(want.shape):
                sys.exit(f"{where}: shape {tuple(have.shape)}, expected {tuple(want.shape)}")
            if have.dtype != want.dtype:
                sys.exit(f"{where}: dtype {have.dtype}, expected {want.dtype}")
            err = (have - want).abs().max().item() / max(1.0, want.abs().max().item())
            if not err <= TOLERANCE:  # also catches NaN
                sys.exit(f"{where}: max relative |diff| {err:.3g} > {TOLERANCE}")


# -- the table ------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """One table row: a workload and each path's median seconds per step."""

    work: Workload
    median_s: dict[str, float]

    def ms(self, path: str) -> float:
        return self.median_s[path] * 1e3

    def ratio(self, path: str, over: str) -> float:
        return self.median_s[path] / self.median_s[over]


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Result], str]


def _ms(path: str) -> Column:
    return Column(f"{path} ms", lambda r: f"{r.ms(path):.2f}")


def _ratio(path: str, over: str) -> Column:
    return Column(f"{path}/{over}", lambda r: f"{r.ratio(path, over):.2f}x")


def _minus(path: str, over: str) -> Column:
    return Column(f"{path}-{over} ms", lambda r: f"{r.ms(path) - r.ms(over):.2f}")


def _overhead_ratio(path: str, over: str) -> Column:
    """``(path - local) / (over - local)``; n/a where the denominator is not positive (noise)."""
    def cell(r: Result) -> str:
        den = r.ms(over) - r.ms(REFERENCE)
        return f"{(r.ms(path) - r.ms(REFERENCE)) / den:.1f}x" if den > 0 else "n/a"
    return Column(f"{path} overhead/{over} overhead", cell)


ROWS = Column("rows", lambda r: str(r.work.rows))

COLUMNS: list[Column] = [
    ROWS,
    Column("MiB each way", lambda r: f"{2 * r.work.tensor_bytes / MiB:.3g}"),
    _ms("local"),
    _ms("gradserve"),
    _ratio("gradserve", "local"),
    _ms("echo"),
    _ratio("gradserve", "echo"),
    Column("overhead ms", lambda r: f"{r.ms('gradserve') - r.ms('local'):.2f}"),
]

#: The JAX client on the same torch-served endpoint, against local torch and the torch client.
JAX_COLUMNS: list[Column] = [
    ROWS,
    _ms("local_jax"),
    _ms("jax"),
    _ratio("jax", "local"),
    _ratio("jax", "gradserve"),
    _ms("jax_jit"),
    _ratio("jax_jit", "local"),
    _ratio("jax_jit", "gradserve"),
]

#: One empty ``pure_callback`` round trip, next to what the JAX client adds to the torch client.
CALLBACK_COLUMNS: list[Column] = [
    ROWS,
    Column("MiB each way", lambda r: f"{r.work.tensor_bytes / MiB:.3g}"),
    _ms("callback"),
    _ms("callback_jit"),
    _minus("jax", "gradserve"),
    _minus("jax_jit", "gradserve"),
]

def _overhead(path: str, label: str | None = None) -> Column:
    return Column(f"{label or path} overhead ms", lambda r: f"{r.ms(path) - r.ms(REFERENCE):.2f}")


def _over_memcpy(path: str) -> Column:
    return Column(f"{path} overhead/memcpy",
                  lambda r: f"{(r.ms(path) - r.ms(REFERENCE)) / r.ms('memcpy'):.1f}x")


#: The torch client over shared memory ("shm": inputs copied into the arena; "shm_arena":
#: inputs allocated there) and over bytes ("gradserve"), with the time of one memcpy of the
#: bytes a step moves; overheads are over local.
SHM_COLUMNS: list[Column] = [
    ROWS,
    Column("MiB per tensor", lambda r: f"{r.work.tensor_bytes / MiB:.3g}"),
    _ms("local"),
    Column("bytes ms", lambda r: f"{r.ms('gradserve'):.2f}"),
    _ms("shm"),
    _ms("shm_arena"),
    _overhead("gradserve", "bytes"),
    _overhead("shm"),
    _overhead("shm_arena"),
    _ms("memcpy"),
    _over_memcpy("shm"),
    _over_memcpy("shm_arena"),
    Column("bytes/shm overhead", _overhead_ratio("gradserve", "shm").cell),
    Column("bytes/shm_arena overhead", _overhead_ratio("gradserve", "shm_arena").cell),
]
SHM_PATHS = ("local", "gradserve", "shm", "shm_arena", "memcpy")

#: A Hessian-vector product by double backward: local torch against the torch client.
HVP_COLUMNS: list[Column] = [
    ROWS,
    _ms("local_hvp"),
    _ms("hvp"),
    _ratio("hvp", "local_hvp"),
    _minus("hvp", "local_hvp"),
    Column("hvp/gradserve", lambda r: f"{r.ratio('hvp', 'gradserve'):.2f}x"),
    _ms("jax_hvp"),
    _ratio("jax_hvp", "local_hvp"),
]
HVP_PATHS = ("local", "gradserve", "local_hvp", "hvp", "jax_hvp")

CUDA_COLUMNS: list[Column] = [
    ROWS,
    Column("MiB per tensor", lambda r: f"{r.work.tensor_bytes / MiB:.3g}"),
    _ms("local_cuda"),
    _ms("cuda_ipc"),
    _ratio("cuda_ipc", "local_cuda"),
    _minus("cuda_ipc", "local_cuda"),
    _ms("memcpy_cuda"),
]
CUDA_PATHS = ("local", "local_cuda", "cuda_ipc", "memcpy_cuda")

#: The torch client to a server in another process: bytes in the gRPC stream, UCX over TCP,
#: UCX with its shared-memory transports allowed, gradserve's shared memory; next to a raw
#: TCP round trip of the same bytes to another process.
UCX_COLUMNS: list[Column] = [
    ROWS,
    Column("MiB per tensor", lambda r: f"{r.work.tensor_bytes / MiB:.3g}"),
    _ms("local"),
    _ms("bytes_x"),
    _ms("ucx_tcp"),
    _ms("ucx_shm"),
    _ms("shm_x"),
    _ms("raw_tcp"),
    _overhead("bytes_x"),
    _overhead("ucx_tcp"),
    _overhead("ucx_shm"),
    _overhead("shm_x"),
    Column("ucx_tcp overhead/raw_tcp",
           lambda r: f"{(r.ms('ucx_tcp') - r.ms(REFERENCE)) / r.ms('raw_tcp'):.2f}x"),
    Column("bytes/ucx_tcp overhead", _overhead_ratio("bytes_x", "ucx_tcp").cell),
]
UCX_PATHS = ("local", "bytes_x", "ucx_tcp", "ucx_shm", "shm_x", "raw_tcp")
DEFAULT_UCX_ROWS = (65536, 262144)
TARGET_UCX_OVER_RAW = 2.0       # UCX-over-TCP overhead at most this many raw TCP round trips
TARGET_BYTES_OVER_UCX = 3.0     # bytes overhead at least this many UCX-over-TCP overheads
#: CUDA IPC overhead allowed at 256 MiB per tensor.
TARGET_CUDA_OVERHEAD_MS = 2.0


@dataclass(frozen=True)
class Table:
    """A printed table: a title (None for the main one), its columns, and which rows it shows.

    ``paths`` are those its columns read (None: every path); ``shm_rows`` says its rows
    are ``--shm-rows`` rather than ``--rows``.
    """

    title: str | None
    columns: list[Column]
    paths: tuple[str, ...] | None = None
    shm_rows: bool = False
    needs_cuda: bool = False
    ucx_rows: bool = False

    def rows(self, args: argparse.Namespace) -> list[int]:
        if self.ucx_rows:
            return list(args.ucx_rows)
        return list(args.shm_rows if self.shm_rows else args.rows)


TABLES: list[Table] = [
    Table(None, COLUMNS),
    Table(("JAX client (client.jax), same torch-served endpoint; local_jax = jitted "
           "jnp.tanh(x @ W) vjp; ratios over local (torch) and gradserve (torch client):"),
          JAX_COLUMNS),
    Table(("One jax.pure_callback round trip of x with an empty body (a JAX client step makes "
           "two: forward, vjp), next to what the JAX client adds over the torch client:"),
          CALLBACK_COLUMNS),
    Table(("Torch client over the shared-memory transport (shm: x and ct copied into the "
           "arena; shm_arena: x and ct allocated there with client.as_shared) and over bytes "
           "in the gRPC stream (bytes = gradserve above); overhead = remote - local; memcpy = "
           "np.copyto of the 4 tensors a step moves (x, ct up; y, grad down) into warm "
           "buffers, one thread:"),
          SHM_COLUMNS, SHM_PATHS, shm_rows=True),
    Table(("Hessian-vector product of sum(y * ct) in x at v = ct, by double backward "
           "(create_graph): local torch against the torch client over bytes (a Forward, a "
           "kept Vjp and a Vjp of that Vjp per step); hvp/gradserve = over one forward + vjp "
           "step; jax_hvp = the JAX client under jax.jit, jax.jvp of jax.grad (the same three "
           "calls):"),
          HVP_COLUMNS, HVP_PATHS),
    Table(("Torch client over CUDA IPC (x and ct allocated in the request pool), layer on the "
           "GPU; overhead = cuda_ipc - local_cuda; memcpy_cuda = device-to-device copies of "
           "the 4 tensors a step moves:"),
          CUDA_COLUMNS, CUDA_PATHS, shm_rows=True, needs_cuda=True),
    Table(("Torch client to a server in another process (the ucx extra): bytes_x = bytes in "
           "the gRPC stream, ucx_tcp = UCX with the server's UCX_TLS=tcp (as across nodes), "
           "ucx_shm = UCX with its shared-memory transports allowed (UCX_POSIX/SYSV_ERROR_"
           "HANDLING=y), shm_x = gradserve's shared memory; raw_tcp = a raw TCP socket round "
           "trip of x and of ct to another process (the floor over TCP); overhead = remote - "
           "local:"),
          UCX_COLUMNS, UCX_PATHS, ucx_rows=True),
]
ACTIVE_TABLES = [t for t in TABLES if (CUDA or not t.needs_cuda) and (UCX or not t.ucx_rows)]

#: The targets the verdict line checks, for tensors of at least ``TARGET_BYTES``.
TARGET_BYTES = 64 << 20
TARGET_SHM_OVER_MEMCPY = 2.0    # shm overhead at most this many memcpy times
TARGET_BYTES_OVER_SHM = 20.0    # bytes overhead at least this many shm overheads


def verdict(results: Sequence[Result], path: str) -> str:
    """One line: ``path``'s big rows in the shm table against the targets (worst row decides)."""
    big = [r for r in results if r.work.tensor_bytes >= TARGET_BYTES]
    if not big:
        return f"verdict: no shm-table row with tensors of {TARGET_BYTES / MiB:g} MiB or more"
    shm = [r.ms(path) - r.ms("local") for r in big]
    over_memcpy = [o / r.ms("memcpy") for o, r in zip(shm, big)]
    over_shm = [(r.ms("gradserve") - r.ms("local")) / o if o > 0 else float("inf")
                for o, r in zip(shm, big)]
    ok_memcpy = max(over_memcpy) <= TARGET_SHM_OVER_MEMCPY
    ok_bytes = min(over_shm) >= TARGET_BYTES_OVER_SHM

    def fmt(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}x" for v in values)

    return (f"verdict for {path} at >= {TARGET_BYTES / MiB:g} MiB per tensor "
            f"(rows {', '.join(str(r.work.rows) for r in big)}): "
            f"overhead = {fmt(over_memcpy)} memcpy (target <= {TARGET_SHM_OVER_MEMCPY:g}x: "
            f"{'met' if ok_memcpy else 'MISSED'}), bytes/{path} overhead = {fmt(over_shm)} "
            f"(target >= {TARGET_BYTES_OVER_SHM:g}x: {'met' if ok_bytes else 'MISSED'})")


def ucx_verdict(results: Sequence[Result]) -> str:
    """One line: UCX over TCP at 64 MiB per tensor and more against its targets (worst row)."""
    big = [r for r in results if r.work.tensor_bytes >= TARGET_BYTES]
    if not big:
        return f"verdict for ucx_tcp: no row with tensors of {TARGET_BYTES / MiB:g} MiB or more"
    over_raw = [(r.ms("ucx_tcp") - r.ms("local")) / r.ms("raw_tcp") for r in big]
    over_ucx = [(r.ms("bytes_x") - r.ms("local")) / max(1e-9, r.ms("ucx_tcp") - r.ms("local"))
                for r in big]
    ok_raw, ok_bytes = max(over_raw) <= TARGET_UCX_OVER_RAW, min(over_ucx) >= TARGET_BYTES_OVER_UCX
    return (f"verdict for ucx_tcp at >= {TARGET_BYTES / MiB:g} MiB per tensor: overhead = "
            f"{', '.join(f'{v:.2f}x' for v in over_raw)} the raw TCP round trip (target <= "
            f"{TARGET_UCX_OVER_RAW:g}x: {'met' if ok_raw else 'MISSED'}), bytes/ucx_tcp overhead "
            f"= {', '.join(f'{v:.1f}x' for v in over_ucx)} (target >= {TARGET_BYTES_OVER_UCX:g}x: "
            f"{'met' if ok_bytes else 'MISSED'})")


def cuda_verdict(results: Sequence[Result]) -> str:
    """One line: the CUDA IPC overhead at 256 MiB per tensor against its target."""
    big = [r for r in results if r.work.tensor_bytes >= 256 << 20]
    if not big:
        return "verdict for cuda_ipc: no row with tensors of 256 MiB or more"
    worst = max(r.ms("cuda_ipc") - r.ms("local_cuda") for r in big)
    return (f"verdict for cuda_ipc at >= 256 MiB per tensor: overhead {worst:.2f} ms (target < "
            f"{TARGET_CUDA_OVERHEAD_MS:g} ms: {'met' if worst < TARGET_CUDA_OVERHEAD_MS else 'MISSED'})")


def render(results: Sequence[Result], columns: Sequence[Column]) -> str:
    """A markdown table, numbers right-aligned."""
    cells = [[c.cell(r) for c in columns] for r in results]
    widths = [max(len(c.header), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.header.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def header(budget: Budget) -> str:
    jax = sys.modules.get("jax")  # imported by the JAX paths, if they ran
    jax_version = f"jax {jax.__version__} ({jax.default_backend()}), " if jax else ""
    big = (f" (tensors >= {BIG_BYTES / MiB:g} MiB: {budget.big.rounds} rounds, "
           f"~{budget.big.seconds:g} s)" if budget.big else "")
    return "\n".join([
        f"gradserve bench: y = tanh(x @ W), x (rows, {WIDTH}) float32, one forward + vjp per step",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {jax_version}"
        f"grpcio {grpc.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"medians of {budget.rounds} interleaved rounds, ~{budget.seconds:g} s per cell{big}",
        "client and servers share this process and its cores: on a shared machine the "
        "ratios are the meaningful numbers, not the milliseconds.",
        "gradserve = torch client, transport='grpc' (bytes in the gRPC stream); "
        "MiB each way = x + ct up, y + grad down; echo = bare gRPC stream-stream echo of the "
        f"same bytes in {CHUNK_BYTES / MiB:g} MiB chunks (no protobuf, no compute).",
    ])


def _row_counts(text: str) -> list[int]:
    try:
        rows = [int(v) for v in text.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 16,4096, got {text!r}")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter samples")
    parser.add_argument("--rows", type=_row_counts,
                        default=list(DEFAULT_ROWS),
                        help="comma-separated row counts (default: "
                             f"{','.join(map(str, DEFAULT_ROWS))})")
    parser.add_argument("--shm-rows", type=_row_counts,
                        default=list(DEFAULT_SHM_ROWS),
                        help="row counts of the shared-memory table, whose paths alone run at "
                             "those not in --rows (default: "
                             f"{','.join(map(str, DEFAULT_SHM_ROWS))})")
    parser.add_argument("--ucx-rows", type=_row_counts, default=list(DEFAULT_UCX_ROWS),
                        help="row counts of the UCX table (default: "
                             f"{','.join(map(str, DEFAULT_UCX_ROWS))})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    started = time.perf_counter()
    module = Layer()
    results: dict[int, Result] = {}
    with contextlib.ExitStack() as stack:
        makers = {name: stack.enter_context(path(module)) for name, path in PATHS.items()}
        for rows in sorted(set(args.rows) | set(args.shm_rows)
                           | (set(args.ucx_rows) if UCX else set())):
            wanted: set[str] = {REFERENCE}
            for table in ACTIVE_TABLES:
                if rows in table.rows(args):
                    wanted |= set(table.paths or PATHS)
            work = Workload.make(rows)
            steps = {name: make(work) for name, make in makers.items() if name in wanted}
            check(work, steps)
            results[rows] = Result(work, measure(steps, budget_for(work, budget)))
            del steps, work   # free this row's tensors (and arena slots) before the next
    print(header(budget))
    for table in ACTIVE_TABLES:
        print()
        if table.title:
            print(table.title)
        print(render([results[rows] for rows in table.rows(args)], table.columns))
    print()
    for path in ("shm", "shm_arena"):
        print(verdict([results[rows] for rows in args.shm_rows], path))
    if UCX:
        print(ucx_verdict([results[rows] for rows in args.ucx_rows]))
    if CUDA:
        print(cuda_verdict([results[rows] for rows in args.shm_rows]))
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
