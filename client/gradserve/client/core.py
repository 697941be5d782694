"""The framework-neutral client: one connection to a gradserve server.

``Client`` speaks the protocol (framing, codec, error mapping, residual
lifetime, the same-host session). Autograd front-ends (``client.torch(...)``,
``client.jax(...)``, found through :mod:`gradserve.frameworks`) build on its
``call_forward``/``call_vjp``; the low-level ``forward``/``vjp`` methods expose
the same RPCs on numpy arrays (or any framework's arrays).
"""

from __future__ import annotations

import collections
import importlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator, TypeVar

import grpc

from gradserve import frameworks
from gradserve.client.session import Session
from gradserve.client.transports import TRANSPORTS
from gradserve.errors import (REPLY_TOO_LARGE, DeadlineExceeded, GradserveError, RemoteError,
                              ResidualMissing, ResourceExhausted, SessionMissing, Unavailable,
                              from_rpc_error, rpc)
from gradserve.security import TLSConfig, identified, tls_config, token_from
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire import codec, dtypes, pytree
from gradserve.wire.codec import Arguments, MakeLeaf
from gradserve.wire.framing import DEFAULT_CHUNK_BYTES, FrameReader, FrameWriter
from gradserve.wire.memory import Data, WireTensor, copy_into
from gradserve.wire.slots import SessionInfo
from gradserve.wire.specs import EndpointInfo, TensorType

#: ``transport=`` values: "auto", "grpc" (bytes in the gRPC stream), then each same-host one.
TRANSPORT_NAMES = ("auto", "grpc", *TRANSPORTS)
#: Seconds between attempts to open a same-host session with a server not reachable yet.
RENEGOTIATE_SECONDS = 1.0
log = logging.getLogger("gradserve.client")
T = TypeVar("T")

#: Gradients mirror a call's inputs: ``args``, ``kwargs``, ``parameters``.
Gradients = Arguments


@dataclass
class Call:
    """One invocation's inputs: what Forward sends and a recomputing Vjp re-sends.

    ``requires_grad(leaf)`` flags the leaves to differentiate (None: none).
    """

    endpoint: str
    inputs: Arguments
    requires_grad: Callable[[Any], bool] | None = None


class Residual:
    """A handle to the state a Forward kept on the server for its Vjp.

    Holds the call's inputs so a Vjp can recompute when the server no longer
    has the residual (one with no id always recomputes). Dropping the handle
    queues a Release to the server.
    """

    def __init__(self, call: Call, residual_id: str = "",
                 release_queue: collections.deque[str] | None = None):
        self.call = call
        self.id = residual_id
        self._finalizer = (weakref.finalize(self, release_queue.append, residual_id)
                           if residual_id and release_queue is not None else None)

    def detach(self) -> None:
        """Forget the server-side id (after an explicit release)."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self.id = ""


@dataclass
class ForwardResult:
    """Outputs of a low-level ``Client.forward`` and the residual for ``vjp``."""

    outputs: Any
    residual: Residual | None


def numpy_leaf(wire: WireTensor, path: str) -> Any:
    """Decode a wire tensor to a numpy array (the low-level API's array type)."""
    return frameworks.adapter("numpy").from_wire(wire)


def _differentiable_leaf(x: Any) -> bool:
    adapter = frameworks.adapter_for(x)
    return adapter is not None and adapter.wire_dtype(x) in dtypes.DIFFERENTIABLE


class Client:
    """A connection to one gradserve server.

    ``timeout`` (seconds) is the default deadline of every call;
    ``chunk_bytes`` is the largest gRPC message this client sends.
    ``transport`` (the value asked for; ``client.transport`` is the one in use):
    ``"grpc"`` sends tensor bytes in the gRPC stream;
    ``"shm"`` moves them through shared memory (same host only);
    ``"cuda_ipc"`` also moves GPU tensors through CUDA IPC pools on the GPUs
    both sides see (CPU tensors of the same call use shared memory); a forced
    transport that cannot work raises when it is negotiated (``connect``, or
    the first call). ``"auto"`` takes the best of these that works, saying why
    it did not get a better one in ``fallback_reason``; a server not reachable
    yet is asked again on later calls, so a client started before its server
    still gets shared memory. ``arena_bytes`` sizes the shared-memory regions'
    first pair and ``cuda_pool_bytes`` the CUDA IPC pools (0: the server's defaults).
    ``channel`` replaces the channel the client would open (a test seam, or a
    channel with interceptors); ``close`` leaves an injected channel open. A
    backward whose server is unavailable is re-sent (with its inputs) until its
    deadline, or for ``retry_seconds`` where it has none. ``tls`` (True: verify the
    server against the system's roots; a ``TLSConfig``: a CA, a client certificate for
    mutual TLS, the name to verify; None: ``$GRADSERVE_TLS_CA`` and its companions if
    set; False: plaintext) opens a TLS channel; ``token`` (default ``$GRADSERVE_TOKEN``)
    is sent with every call as ``authorization: Bearer <token>``.
    """

    def __init__(self, address: str, *, timeout: float | None = None,
                 transport: str = "auto", arena_bytes: int = 0, cuda_pool_bytes: int = 0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_receive_bytes: int = 1 << 42,
                 options: Iterable[tuple[str, Any]] = (), channel: grpc.Channel | None = None,
                 retry_seconds: float = 30.0, tls: bool | TLSConfig | None = None,
                 token: str | None = None):
        if transport not in TRANSPORT_NAMES:
            raise ValueError(f"transport must be one of {TRANSPORT_NAMES}, got {transport!r}")
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.max_receive_bytes = max_receive_bytes
        self.requested = transport
        self.retry_seconds = retry_seconds
        self.region_bytes = {"shm": arena_bytes, "cuda_ipc": cuda_pool_bytes}
        self._owns_channel = channel is None
        self.tls = tls_config(tls)
        if channel is None:
            options = [("grpc.max_receive_message_length", -1),
                       ("grpc.max_send_message_length", -1), *options]
            if self.tls is not None:
                channel = grpc.secure_channel(address, self.tls.channel_credentials(),
                                              options=[*options, *self.tls.channel_options()])
            else:
                channel = grpc.insecure_channel(address, options=options)
        self._channel = channel
        self._stub = pb_grpc.GradserveStub(identified(channel, token_from(token)))
        self._released: collections.deque[str] = collections.deque()
        self.fallback_reason = ""
        self._session: Session | None = None
        self._session_lock = threading.Lock()
        self._closed = False
        #: whether the server has one-message Forward/Vjp calls (older ones do not)
        self._one_message = True
        #: (call, endpoint) whose last one-message reply was large: they stream
        self._large_replies: set[tuple[str, str]] = set()
        #: when to (re)try opening a same-host session; None: settled
        self._negotiate_at: float | None = None if transport == "grpc" else 0.0

    # -- lifecycle ---------------------------------------------------------
    def open(self) -> "Client":
        """Negotiate the same-host transport now (``connect`` does): a forced transport
        that cannot work raises here; a server not reachable yet is asked again later."""
        with self._session_lock:
            if self._negotiate_at is not None:
                self._negotiate()
        return self

    def close(self) -> None:
        """Release pending residuals (best effort), end the session, close the channel."""
        if self._closed:
            return
        self._flush_releases(timeout=1.0)
        self._closed = True
        with self._session_lock:
            session, self._session = self._session, None
            self._negotiate_at = None
        if session is not None:
            session.close()
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def transport(self) -> str:
        """The transport in use: the best of the session's, or "grpc" without one."""
        session = self._session
        return session.transports[-1].name if session is not None else "grpc"

    def session_info(self) -> SessionInfo | None:
        """The same-host session in use (regions, pending frees, copy counters), if any."""
        session = self._session
        return session.info() if session is not None else None

    @property
    def stub(self) -> pb_grpc.GradserveStub:
        """The client's gRPC stub (its token and identity go with every call): for requests
        no front-end makes, such as a test's hand-made ones."""
        return self._stub

    @property
    def pending_releases(self) -> int:
        """Residuals dropped here whose release the server has not been sent yet."""
        return len(self._released)

    # -- discovery ---------------------------------------------------------
    def endpoints(self, *, timeout: float | None = None) -> list[EndpointInfo]:
        """Every endpoint the server hosts."""
        reply = self._unary(self._stub.ListEndpoints, pb.ListEndpointsRequest(), timeout)
        return [EndpointInfo.from_pb(e) for e in reply.endpoints]

    def describe(self, name: str, *, timeout: float | None = None) -> EndpointInfo:
        """One endpoint's details, the server's residual statistics and (for an endpoint
        that batches) what batching did."""
        reply = self._unary(self._stub.Describe, pb.DescribeRequest(endpoint=name), timeout)
        return EndpointInfo.from_pb(reply.endpoint, reply.residuals,
                                    reply.batches if reply.HasField("batches") else None)

    def parameters(self, name: str, *, like: str = "numpy",
                   timeout: float | None = None) -> dict[str, Any]:
        """The endpoint's own parameter values, as arrays of framework ``like``."""
        adapter = frameworks.adapter(like)
        self._flush_releases(timeout)
        reader: FrameReader[Any] = FrameReader(self.max_receive_bytes)
        frames = self._invoke(self._stub.GetParameters, pb.GetParametersRequest(endpoint=name),
                              timeout)
        header = self._read(reader, frames)
        found: dict[str, Any] = codec.decode(header, reader,
                                             lambda wire, path: adapter.from_wire(wire),
                                             "parameters")
        return found

    # -- low-level differentiable calls ------------------------------------
    def forward(self, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                *, parameters: Any = None, need_vjp: bool = False,
                timeout: float | None = None) -> ForwardResult:
        """Run the endpoint on numpy arrays (or any framework's arrays).

        With ``need_vjp`` every floating-point input is differentiable and the
        result carries a residual for :meth:`vjp`.
        """
        call = Call(name, Arguments(tuple(args), dict(kwargs or {}), parameters),
                    _differentiable_leaf if need_vjp else None)
        outputs, residual = self.call_forward(call, numpy_leaf, need_vjp=need_vjp, timeout=timeout)
        return ForwardResult(outputs, residual)

    def vjp(self, residual: Residual, cotangents: Any, *, batched: bool = False,
            timeout: float | None = None) -> Arguments:
        """Vector-Jacobian product for the inputs a ``forward(need_vjp=True)`` flagged.

        With ``batched``, cotangents carry an extra leading axis of B vectors and
        the gradients come back with it: B products in one call.
        """
        return self.call_vjp(residual, cotangents, numpy_leaf, batched=batched, timeout=timeout)

    def signature(self, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                  parameters: Any = None, *, timeout: float | None = None) -> Any:
        """Output types of a call whose tensors are given as :class:`TensorType` leaves, or
        as arrays, which stand for their types (nothing runs on the server)."""
        def as_type(x: Any) -> Any:
            adapter = frameworks.adapter_for(x)
            assert adapter is not None
            return TensorType(tuple(int(d) for d in x.shape), dtypes.name_of(adapter.wire_dtype(x)))

        tree = pytree.map_leaves(as_type, (tuple(args), dict(kwargs or {}), parameters),
                                 lambda x: frameworks.adapter_for(x) is not None)
        request = pb.ForwardRequest(endpoint=name)
        codec.encode_arguments(Arguments(*tree), FrameWriter(), request)
        reply = self._unary(self._stub.Signature, pb.SignatureRequest(call=request), timeout)
        reader: FrameReader[Any] = FrameReader(self.max_receive_bytes)
        outputs = reader.read_header(reply.outputs)
        return codec.decode(outputs, reader, numpy_leaf, "outputs", abstract=True)

    def release(self, *residuals: Residual, timeout: float | None = None) -> int:
        """Free residuals on the server now; returns how many it still held."""
        ids = [r.id for r in residuals if r.id]
        for r in residuals:
            r.detach()
        if not ids:
            return 0
        released: int = self._unary(self._stub.Release, pb.ReleaseRequest(residual_ids=ids),
                                    timeout, flush=False).released
        return released

    # -- arrays in the session's request slots -----------------------------
    def empty(self, shape: tuple[int, ...], dtype: Any = "float32", *, like: str = "torch",
              device: Any = None) -> Any:
        """An uninitialised array of framework ``like`` ("torch", "numpy", "jax") that
        lives in a request slot of the same-host session: sending it copies nothing. A
        ``device`` on a GPU (torch) puts it in that GPU's CUDA IPC pool. Without a
        session (or with its regions full) it is an ordinary array."""
        adapter = frameworks.adapter(like)
        code = adapter.dtype_code(dtype)
        shape = tuple(int(d) for d in shape)
        data = self._allocate(adapter, code, shape, device)
        if data is None:
            return adapter.empty(shape, code, device)
        return adapter.from_wire(WireTensor(code, shape, data))

    def as_shared(self, array: Any) -> Any:
        """A copy of ``array`` (torch, numpy or JAX) in a request slot (see :meth:`empty`);
        an ordinary copy, on the array's device, where no slot can be had."""
        adapter = frameworks.adapter_for(array)
        if adapter is None:
            raise TypeError(f"as_shared needs an array, got {type(array).__name__}")
        code, shape = adapter.wire_dtype(array), tuple(int(d) for d in array.shape)
        data = self._allocate(adapter, code, shape, adapter.device(array))
        if data is None:
            return adapter.copy(array)
        copy_into(data, adapter.to_wire(array).data)
        return adapter.from_wire(WireTensor(code, shape, data))

    def _allocate(self, adapter: frameworks.ArrayAdapter, code: int, shape: tuple[int, ...],
                  device: Any) -> Data | None:
        """A request slot for an array of ``adapter``'s framework on ``device``, or None."""
        nbytes = dtypes.nbytes(code, shape)
        gpu = adapter.gpu(device)
        session = self._session_now()
        if session is None or not nbytes or gpu == frameworks.NO_SLOT:
            return None
        return session.allocate(nbytes, gpu)

    # -- autograd front-ends -----------------------------------------------
    def torch(self, name: str, *, timeout: float | None = None) -> Any:
        """The endpoint as a differentiable function of torch tensors."""
        return _frontend("torch").RemoteFunction(self, name, timeout=timeout)

    def torch_module(self, name: str, *, timeout: float | None = None) -> Any:
        """A ``torch.nn.Module`` holding local, trainable copies of the endpoint's parameters."""
        return _frontend("torch").RemoteModule(self, name, timeout=timeout)

    def jax(self, name: str, *, timeout: float | None = None, **options: Any) -> Any:
        """The endpoint as a differentiable function of ``jax.Array`` pytrees."""
        return _frontend("jax").RemoteJaxFunction(self, name, timeout=timeout, **options)

    def jax_params(self, name: str, *, timeout: float | None = None) -> Any:
        """The endpoint's parameters as a pytree of ``jax.Array`` (for ``f.apply(params, ...)``)."""
        return self.parameters(name, like="jax", timeout=timeout)

    # -- the protocol, for front-ends --------------------------------------
    def call_forward(self, call: Call, make_leaf: MakeLeaf, *, need_vjp: bool,
                     timeout: float | None = None) -> tuple[Any, Residual | None]:
        """Send a Forward; returns the decoded outputs and, with ``need_vjp``, a residual."""
        found: tuple[Any, Residual | None] = self._in_session(
            lambda session: self._forward_once(session, call, make_leaf, need_vjp, timeout))
        return found

    def call_vjp(self, residual: Residual, cotangents: Any, make_leaf: MakeLeaf, *,
                 batched: bool = False, timeout: float | None = None) -> Arguments:
        """Send a Vjp; re-sends the inputs if the server lost the residual, and, while the
        server is unavailable (restarting, draining), again until the call's deadline
        (``timeout``, else the client's, else ``retry_seconds``) has passed.

        With ``batched``, every cotangent has an extra leading axis and so do the gradients.
        """
        limit = self._deadline(timeout)
        until = time.monotonic() + (limit if limit is not None else self.retry_seconds)

        def vjp(resend: bool) -> Arguments:
            left = until - time.monotonic() if limit is not None else None
            found: Arguments = self._in_session(lambda session: self._vjp_once(
                session, residual, cotangents, make_leaf, resend, batched, left))
            return found

        if residual.id:
            try:
                return vjp(False)
            except ResidualMissing:
                residual.detach()
            except Unavailable:   # the id goes along with the inputs: a server back may hold it
                if time.monotonic() >= until:
                    raise
        pause = 0.05
        while True:
            try:
                return vjp(True)
            except Unavailable:
                if time.monotonic() + pause >= until:
                    raise
                log.info("gradserve: %s unavailable; re-sending the backward's inputs in %.2f s",
                         self.address, pause)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def _forward_once(self, session: Session | None, call: Call, make_leaf: MakeLeaf,
                      need_vjp: bool, timeout: float | None) -> tuple[Any, Residual | None]:
        writer = FrameWriter(self.chunk_bytes, slots=session)
        request = pb.ForwardRequest(endpoint=call.endpoint, need_vjp=need_vjp)
        kept = False
        try:
            codec.encode_arguments(call.inputs, writer, request, call.requires_grad)
            request.release.extend(self._take_releases())
            header, outputs = self._exchange(
                "Forward", request, writer, session, timeout,
                lambda header, reader: codec.decode(header.outputs, reader, make_leaf, "outputs"))
            residual = Residual(call, header.residual_id, self._released) if need_vjp else None
            if residual is not None and residual.id and writer.placed and session is not None:
                # the server's residual views these input slots: keep them while it lives
                weakref.finalize(residual, session.free, writer.placed)
                kept = True
            return outputs, residual
        except BaseException:
            self._released.extend(request.release)  # releasing twice is harmless
            raise
        finally:
            if not kept:
                writer.free_placed()

    def _vjp_once(self, session: Session | None, residual: Residual, cotangents: Any,
                  make_leaf: MakeLeaf, resend: bool, batched: bool,
                  timeout: float | None) -> Arguments:
        writer = FrameWriter(self.chunk_bytes, slots=session)
        try:
            request = pb.VjpRequest(endpoint=residual.call.endpoint, residual_id=residual.id,
                                    batched_cotangents=batched)
            codec.encode_into(request.cotangents, cotangents, writer, path="cotangents")
            if resend:
                request.inputs.endpoint = residual.call.endpoint
                request.inputs.need_vjp = True
                codec.encode_arguments(residual.call.inputs, writer, request.inputs,
                                       residual.call.requires_grad)
            _, grads = self._exchange(
                "Vjp", request, writer, session, timeout,
                lambda header, reader: codec.decode_arguments(header, reader, make_leaf))
            return grads
        finally:
            writer.free_placed()

    # -- plumbing ----------------------------------------------------------
    def _exchange(self, call: str, request: Any, writer: FrameWriter, session: Session | None,
                  timeout: float | None,
                  decode: Callable[[Any, FrameReader[Any]], T]) -> tuple[Any, T]:
        """Send a Forward or Vjp (``call``); the reply header and what ``decode`` makes of
        it. A request that fits in one message goes as one (``ForwardUnary``/``VjpUnary``)
        unless this endpoint's last such reply was large; the rest stream. If the call
        fails, the freed reply slots it reported are reported again, and so are the reply
        slots it named that were never viewed."""
        state = session.state() if session is not None else None
        if state is not None:
            request.session.CopyFrom(state)
        reader: FrameReader[Session] = FrameReader(self.max_receive_bytes,
                                                   slots_for=lambda header: session)
        key = (call, request.endpoint)
        try:
            writer.flush()
            header = None
            if writer.one_message and self._one_message and key not in self._large_replies:
                try:
                    header = reader.read_header(
                        self._invoke(getattr(self._stub, call + "Unary"), request, timeout))
                except RemoteError as err:
                    if err.reason == REPLY_TOO_LARGE:   # this endpoint's replies are large
                        self._large_replies.add(key)
                    elif err.code == grpc.StatusCode.UNIMPLEMENTED:
                        self._one_message = False   # a server from before one-message calls
                    else:
                        raise
                else:
                    if header.ByteSize() > self.chunk_bytes:
                        self._large_replies.add(key)
            if header is None:
                frame_type = getattr(pb, call + "Frame")
                frames = self._invoke(getattr(self._stub, call),
                                      writer.frames(frame_type, request), timeout)
                header = self._read(reader, frames)
                if not reader.chunked:
                    self._large_replies.discard(key)
            decoded = decode(header, reader)
        except BaseException:
            if session is not None and state is not None:
                session.put_back([*state.freed_slots, *reader.unviewed()])
            raise
        if reader.spilled and session is not None:   # the reply regions were full: grow them
            session.spilled(reader.spilled)
        return header, decoded

    def _in_session(self, attempt: Callable[[Session | None], Any]) -> Any:
        """Run a call in the current session; if the server lost it (a restart), reopen once."""
        session = self._session_now()
        try:
            return attempt(session)
        except SessionMissing:
            if session is None:
                raise
            self._reopen(session)
            return attempt(self._session_now())

    def _session_now(self) -> Session | None:
        """The session calls go through, negotiating it first where that is due."""
        self._check_open()
        due = self._negotiate_at
        forced = self.requested not in ("auto", "grpc")
        if due is not None and time.monotonic() >= due:
            if self._session_lock.acquire(blocking=forced):
                try:
                    if self._negotiate_at is not None:
                        self._negotiate()
                finally:
                    self._session_lock.release()
        session = self._session
        if session is None and forced:
            reason = f"the {self.requested} transport is not set up: {self.fallback_reason}"
            if self._negotiate_at is not None:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, reason)
            raise GradserveError(reason)
        return session

    def _reopen(self, lost: Session) -> None:
        """Replace a session the server no longer holds (once, whichever thread asks)."""
        with self._session_lock:
            if self._session is lost:
                log.info("gradserve: same-host session lost (server restarted?); reopening")
                lost.close(tell_server=False)
                self._session = None
                self._negotiate()

    def _negotiate(self) -> None:
        """Open a same-host session for the requested transport (holding the session lock)."""
        names = list(TRANSPORTS)
        if self.requested != "auto":
            names = names[:names.index(self.requested) + 1]
        transports = [TRANSPORTS[n](self.region_bytes.get(n, 0)) for n in names]
        local = {t.name: t.unavailable() for t in transports}
        if self.requested != "auto" and local[self.requested]:
            self._settle_failure(local[self.requested])
        usable = [t for t in transports if not local[t.name]]
        reasons = {n: why for n, why in local.items() if why}
        session = None
        if usable:
            try:
                session, reasons = Session.open(self._stub, usable)
            except (Unavailable, DeadlineExceeded) as err:   # no server there yet: ask later
                self._negotiate_at = time.monotonic() + RENEGOTIATE_SECONDS
                self.fallback_reason = f"the server is not reachable yet ({err.message})"
                return
            except ResourceExhausted as err:   # its sessions are all taken: ask later
                self._negotiate_at = time.monotonic() + 10 * RENEGOTIATE_SECONDS
                self.fallback_reason = f"the server has no room for a session now ({err.message})"
                return
            except RemoteError as err:
                reasons = {t.name: str(err) for t in usable}
        self._negotiate_at = None
        in_use = [t.name for t in session.transports] if session is not None else []
        if self.requested not in ("auto", *in_use):
            if session is not None:
                session.close()
            self._settle_failure(reasons.get(self.requested, "the server refused it"))
        if session is not None:
            session.start()
        self._session = session
        rank = ["grpc", *TRANSPORTS]
        candidates = [t.name for t in usable] or names
        self.fallback_reason = "; ".join(
            f"{n}: {reasons[n]}" for n in candidates
            if rank.index(n) > rank.index(self.transport) and n in reasons)
        if self.fallback_reason:
            log.warning("gradserve: using the %s transport to %s (%s)", self.transport,
                        self.address, self.fallback_reason)

    def _settle_failure(self, reason: str) -> None:
        """A forced transport cannot work: remember why, and raise it."""
        self._negotiate_at = None
        self.fallback_reason = reason
        raise GradserveError(f"the {self.requested} transport cannot work here: {reason}")

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _check_open(self) -> None:
        if self._closed:
            raise GradserveError(f"this client of {self.address} is closed")

    def _invoke(self, method: Any, request: Any, timeout: float | None) -> Any:
        """Call an RPC of this client's (its reply, or a stream's iterator)."""
        self._check_open()
        return rpc(method, request, self._deadline(timeout))

    def _unary(self, method: Any, request: Any, timeout: float | None,
               flush: bool = True) -> Any:
        """A unary RPC, after sending queued releases (``flush``)."""
        if flush:
            self._flush_releases(timeout)
        return self._invoke(method, request, timeout)

    @staticmethod
    def _read(reader: FrameReader[Any], frames: Iterator[Any]) -> Any:
        try:
            return reader.read(frames)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _take_releases(self) -> list[str]:
        ids = []
        while self._released:
            ids.append(self._released.popleft())
        return ids

    def _flush_releases(self, timeout: float | None = None) -> None:
        """Send queued releases and freed reply slots; on failure keep both queued."""
        session = self._session
        if not self._released and not (session is not None and session.has_freed()):
            return
        ids = self._take_releases()
        request = pb.ReleaseRequest(residual_ids=ids)
        state = session.state() if session is not None else None
        if state is not None:
            request.session.CopyFrom(state)
        try:
            self._unary(self._stub.Release, request, timeout, flush=False)
        except RemoteError:
            self._released.extend(ids)
            if session is not None and state is not None:
                session.put_back(state.freed_slots)


def _frontend(name: str) -> ModuleType:
    return importlib.import_module(frameworks.framework(name).frontend)


def connect(address: str, **options: Any) -> Client:
    """Open a :class:`Client` to the gradserve server at ``host:port`` and negotiate its
    transport (see :class:`Client` for the options)."""
    return Client(address, **options).open()
