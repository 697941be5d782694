"""The framework-neutral client: one connection to a gradserve server.

``Client`` speaks the protocol (framing, codec, error mapping, residual
lifetime). Framework adapters (``client.torch(...)``) build autograd nodes on
top of its ``call_forward``/``call_vjp``; the low-level ``forward``/``vjp``
methods expose the same RPCs on numpy arrays.
"""

from __future__ import annotations

import collections
import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc
import numpy as np

from gradserve import codec, dtypes, frameworks
from gradserve.client.session import Session
from gradserve.errors import (GradserveError, RemoteError, ResidualMissing, SessionMissing,
                              from_rpc_error)
from gradserve.frameworks import WireTensor
from gradserve.frameworks.numpy import ADAPTER as NUMPY
from gradserve.specs import EndpointInfo
from gradserve.transport.bytes import DEFAULT_CHUNK_BYTES, FrameReader, FrameWriter, free_slots
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

MakeLeaf = Callable[[WireTensor, str], Any]
TRANSPORTS = ("auto", "grpc", "shm", "cuda_ipc")
log = logging.getLogger("gradserve.client")


@dataclass
class Call:
    """One invocation's inputs: what Forward sends and a recomputing Vjp re-sends."""

    endpoint: str
    args: tuple
    kwargs: dict
    parameters: dict | None = None
    requires_grad: Callable[[Any], bool] | None = None


class Residual:
    """A handle to the state a Forward kept on the server for its Vjp.

    Holds the call's inputs so a Vjp can recompute when the server no longer
    has the residual. Dropping the handle queues a Release to the server.
    """

    def __init__(self, call: Call, residual_id: str, release_queue: collections.deque):
        self.call = call
        self.id = residual_id
        if residual_id:
            self._finalizer = weakref.finalize(self, release_queue.append, residual_id)
        else:
            self._finalizer = None

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


@dataclass
class Gradients:
    """Gradients mirroring a call's inputs; None where none was asked for."""

    args: tuple
    kwargs: dict
    parameters: dict | None


def numpy_leaf(wire: WireTensor, path: str) -> np.ndarray:
    """Decode a wire tensor to a numpy array (the low-level API's array type)."""
    return NUMPY.from_wire(wire)


def _differentiable_leaf(x: Any) -> bool:
    adapter = frameworks.adapter_for(x)
    return adapter is not None and adapter.wire_dtype(x) in dtypes.DIFFERENTIABLE


class Client:
    """A connection to one gradserve server.

    ``timeout`` (seconds) is the default deadline of every call;
    ``chunk_bytes`` is the largest gRPC message this client sends.
    ``transport``: ``"grpc"`` sends tensor bytes in the gRPC stream;
    ``"shm"`` moves them through shared memory (same host only: fails here if
    the server is not on this host); ``"cuda_ipc"`` also moves GPU tensors
    through CUDA IPC pools on the GPUs both sides see (fails here if there
    are none; CPU tensors of the same call use shared memory); ``"auto"``
    takes the best of these that works, saying why it did not get a better
    one in ``fallback_reason``. ``client.transport`` is the one in use.
    ``arena_bytes`` sizes the shared-memory arenas' first segment and
    ``cuda_pool_bytes`` the CUDA IPC pools (0: the server's defaults).
    """

    def __init__(self, address: str, *, timeout: float | None = None,
                 transport: str = "auto", arena_bytes: int = 0, cuda_pool_bytes: int = 0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_receive_bytes: int = 1 << 42,
                 options: Iterable[tuple[str, Any]] = ()):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.max_receive_bytes = max_receive_bytes
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            *options,
        ])
        self._stub = pb_grpc.GradserveStub(self._channel)
        self._released: collections.deque[str] = collections.deque()
        self.arena_bytes = arena_bytes
        self.cuda_pool_bytes = cuda_pool_bytes
        self.transport = "grpc"
        self.fallback_reason = ""
        self._session: Session | None = None
        if transport != "grpc":
            try:
                self._session = self._open_session(cuda=transport != "shm")
            except GradserveError as err:
                if transport != "auto":
                    self._channel.close()
                    raise GradserveError(f"the {transport} transport cannot work here: {err}") from None
                self.fallback_reason = str(err)
                log.info("gradserve: using the grpc transport to %s: %s", address, err)
                return
            self.transport = "cuda_ipc" if self._session.cuda is not None else "shm"
            reason = self._session.cuda_reason
            if transport == "cuda_ipc" and self.transport != "cuda_ipc":
                self._session.close()
                self._channel.close()
                raise GradserveError(f"the cuda_ipc transport cannot work here: {reason}")
            if self.transport == "shm" and transport == "auto" and self._session.cuda_asked:
                self.fallback_reason = f"no CUDA IPC: {reason}"
                log.info("gradserve: GPU tensors to %s go through host memory: %s", address, reason)

    def _open_session(self, cuda: bool) -> Session:
        return Session(self._stub, self.arena_bytes, cuda=cuda,
                       cuda_pool_bytes=self.cuda_pool_bytes)

    # -- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        """Release pending residuals (best effort), end the session, close the channel."""
        self._flush_releases(timeout=1.0)
        if self._session is not None:
            self._session.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- discovery ---------------------------------------------------------
    def endpoints(self, *, timeout: float | None = None) -> list[EndpointInfo]:
        """Every endpoint the server hosts."""
        reply = self._unary(self._stub.ListEndpoints, pb.ListEndpointsRequest(), timeout)
        return [EndpointInfo.from_pb(e) for e in reply.endpoints]

    def describe(self, name: str, *, timeout: float | None = None) -> EndpointInfo:
        """One endpoint's details and the server's residual statistics."""
        reply = self._unary(self._stub.Describe, pb.DescribeRequest(endpoint=name), timeout)
        return EndpointInfo.from_pb(reply.endpoint, reply.residuals)

    def parameters(self, name: str, make_leaf: MakeLeaf = numpy_leaf, *,
                   timeout: float | None = None) -> dict[str, Any]:
        """The endpoint's own parameter values, by name."""
        self._flush_releases(timeout)
        reader = FrameReader(self.max_receive_bytes)
        frames = self._stub.GetParameters(pb.GetParametersRequest(endpoint=name),
                                          timeout=self._deadline(timeout))
        header = self._read(reader, frames)
        return codec.decode(header, reader, make_leaf, "parameters")

    # -- low-level differentiable calls ------------------------------------
    def forward(self, name: str, args: tuple = (), kwargs: dict | None = None, *,
                parameters: dict | None = None, need_vjp: bool = False,
                timeout: float | None = None) -> ForwardResult:
        """Run the endpoint on numpy arrays (or any registered framework's arrays).

        With ``need_vjp`` every floating-point input is differentiable and the
        result carries a residual for :meth:`vjp`.
        """
        call = Call(name, tuple(args), dict(kwargs or {}), parameters,
                    _differentiable_leaf if need_vjp else None)
        outputs, residual = self.call_forward(call, numpy_leaf, need_vjp=need_vjp, timeout=timeout)
        return ForwardResult(outputs, residual)

    def vjp(self, residual: Residual, cotangents: Any, *, batched: bool = False,
            timeout: float | None = None) -> Gradients:
        """Vector-Jacobian product for the inputs a ``forward(need_vjp=True)`` flagged.

        With ``batched``, cotangents carry an extra leading axis of B vectors and
        the gradients come back with it: B products in one call.
        """
        return self.call_vjp(residual, cotangents, numpy_leaf, batched=batched, timeout=timeout)

    def signature(self, name: str, args: tuple = (), kwargs: dict | None = None,
                  parameters: Any = None, *, timeout: float | None = None) -> Any:
        """Output specs of a call whose tensors are given as :class:`TensorSpec` leaves."""
        writer = FrameWriter(self.chunk_bytes, inline_bytes=self.chunk_bytes)
        call = self._forward_request(Call(name, tuple(args), dict(kwargs or {}), parameters),
                                     writer, False)
        reply = self._unary(self._stub.Signature, pb.SignatureRequest(call=call), timeout)
        return codec.decode(reply.outputs, FrameReader(0), numpy_leaf, "outputs", abstract=True)

    def release(self, *residuals: Residual, timeout: float | None = None) -> int:
        """Free residuals on the server now; returns how many it still held."""
        ids = [r.id for r in residuals if r.id]
        for r in residuals:
            r.detach()
        if not ids:
            return 0
        return self._unary(self._stub.Release, pb.ReleaseRequest(residual_ids=ids), timeout).released

    # -- tensors in shared memory ------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: Any = "float32", *, like: str = "torch",
              device: Any = None) -> Any:
        """An uninitialised tensor (``like="torch"``), array (``"numpy"``) or
        ``jax.Array`` (``"jax"``: aliasing the arena on CPU) that lives in this
        session's request arena: sending it copies nothing. A torch ``device``
        on a GPU puts it in the session's CUDA IPC pool on that GPU instead.
        Over the grpc transport (or with the arena or pool full) it is an
        ordinary one."""
        if like == "jax":
            from gradserve.client.jax import as_jax
            return as_jax(self.empty(shape, dtype, like="numpy"))
        if like not in ("torch", "numpy"):
            raise ValueError(f"like must be 'torch', 'numpy' or 'jax', got {like!r}")
        if like == "torch":
            import torch
            from gradserve.frameworks.torch import TO_NAME
            code = dtypes.code_of(TO_NAME[dtype] if isinstance(dtype, torch.dtype) else str(dtype))
        else:
            code = dtypes.code_of(np.dtype(dtype).name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtypes.ITEMSIZE[code]
        session = self._session
        if like == "numpy":
            owner = session.shm.allocate(max(nbytes, 1)) if session else None
            np_dtype = dtypes.numpy_dtype(code)
            if owner is None:
                return np.empty(shape, np_dtype)
            return owner[:nbytes].view(np_dtype).reshape(shape)
        from gradserve.frameworks.torch import FROM_CODE
        torch_dtype = FROM_CODE[code]
        place = torch.device(device if device is not None else "cpu")
        if place.type == "cuda":
            index = place.index if place.index is not None else torch.cuda.current_device()
            data = (session.cuda.allocate(nbytes, index)
                    if session and session.cuda and nbytes else None)
            if data is None:
                return torch.empty(shape, dtype=torch_dtype, device=place)
            return torch.from_dlpack(data.array).view(torch_dtype).reshape(shape)
        owner = (session.shm.allocate(nbytes)
                 if session and nbytes and place.type == "cpu" else None)
        if owner is None:
            return torch.empty(shape, dtype=torch_dtype, device=place)
        return torch.frombuffer(memoryview(owner), dtype=torch_dtype).reshape(shape)

    def as_shared(self, tensor: Any) -> Any:
        """A copy of a torch tensor, numpy array or ``jax.Array`` in the request arena
        (see :meth:`empty`)."""
        jax = sys.modules.get("jax")
        if jax is not None and isinstance(tensor, jax.Array):
            from gradserve.client.jax import as_jax
            return as_jax(self.as_shared(np.asarray(tensor)))
        if isinstance(tensor, np.ndarray):
            out = self.empty(tuple(tensor.shape), tensor.dtype, like="numpy")
            np.copyto(out, tensor)
            return out
        out = self.empty(tuple(tensor.shape), tensor.dtype, device=tensor.device)
        return out.copy_(tensor.detach())

    # -- framework adapters ------------------------------------------------
    def torch(self, name: str, *, timeout: float | None = None):
        """The endpoint as a differentiable function of torch tensors."""
        from gradserve.client.torch import RemoteFunction
        return RemoteFunction(self, name, timeout=timeout)

    def torch_module(self, name: str, *, timeout: float | None = None):
        """A ``torch.nn.Module`` holding local, trainable copies of the endpoint's parameters."""
        from gradserve.client.torch import RemoteModule
        return RemoteModule(self, name, timeout=timeout)

    def jax(self, name: str, *, timeout: float | None = None):
        """The endpoint as a differentiable function of ``jax.Array`` pytrees."""
        from gradserve.client.jax import RemoteJaxFunction
        return RemoteJaxFunction(self, name, timeout=timeout)

    def jax_params(self, name: str, *, timeout: float | None = None) -> Any:
        """The endpoint's parameters as a pytree of ``jax.Array`` (for ``f.apply(params, ...)``)."""
        from gradserve.frameworks.jax import ADAPTER
        return self.parameters(name, lambda wire, path: ADAPTER.from_wire(wire), timeout=timeout)

    # -- the protocol, for adapters ----------------------------------------
    def call_forward(self, call: Call, make_leaf: MakeLeaf, *, need_vjp: bool,
                     timeout: float | None = None) -> tuple[Any, Residual | None]:
        """Send a Forward; returns the decoded outputs and, with ``need_vjp``, a residual."""
        return self._in_session(lambda: self._forward_once(call, make_leaf, need_vjp, timeout))

    def _forward_once(self, call: Call, make_leaf: MakeLeaf, need_vjp: bool,
                      timeout: float | None) -> tuple[Any, Residual | None]:
        session = self._session
        writer = FrameWriter(self.chunk_bytes, peers=session.peers if session else ())
        try:
            request = self._forward_request(call, writer, need_vjp)
        except Exception:
            writer.free_placed()
            raise
        if session is not None:
            request.session.CopyFrom(session.state())
        request.release.extend(self._take_releases())
        try:
            header, reader = self._stream(self._stub.Forward, pb.ForwardFrame, request, writer,
                                          session, timeout)
        except Exception:
            self._released.extend(request.release)  # releasing twice is harmless
            writer.free_placed()
            raise
        outputs = codec.decode(header.outputs, reader, make_leaf, "outputs")
        residual = Residual(call, header.residual_id, self._released) if need_vjp else None
        if residual is not None and residual.id and writer.placed:
            # the server's residual views these input slots: keep them while it lives
            weakref.finalize(residual, free_slots, writer.placed)
        else:
            writer.free_placed()
        return outputs, residual

    def call_vjp(self, residual: Residual, cotangents: Any, make_leaf: MakeLeaf, *,
                 batched: bool = False, timeout: float | None = None) -> Gradients:
        """Send a Vjp; re-sends the inputs if the server lost the residual.

        With ``batched``, every cotangent has an extra leading axis and so do the gradients.
        """
        def vjp(resend: bool) -> Gradients:
            return self._in_session(
                lambda: self._vjp_once(residual, cotangents, make_leaf, resend, batched, timeout))

        if residual.id:
            try:
                return vjp(False)
            except ResidualMissing:
                residual.detach()
        return vjp(True)

    def _vjp_once(self, residual: Residual, cotangents: Any, make_leaf: MakeLeaf,
                  resend: bool, batched: bool, timeout: float | None) -> Gradients:
        session = self._session
        writer = FrameWriter(self.chunk_bytes, peers=session.peers if session else ())
        try:
            request = pb.VjpRequest(endpoint=residual.call.endpoint, residual_id=residual.id,
                                    cotangents=codec.encode(cotangents, writer, path="cotangents"),
                                    batched_cotangents=batched)
            if resend:
                request.inputs.CopyFrom(self._forward_request(residual.call, writer, True))
            if session is not None:
                request.session.CopyFrom(session.state())
            header, reader = self._stream(self._stub.Vjp, pb.VjpFrame, request, writer, session,
                                          timeout)
        finally:
            writer.free_placed()
        grads = [codec.decode(getattr(header, part), reader, make_leaf, part)
                 for part in ("args", "kwargs", "parameters")]
        return Gradients(tuple(grads[0] or ()), dict(grads[1] or {}), grads[2])

    @staticmethod
    def _forward_request(call: Call, writer: FrameWriter, need_vjp: bool) -> pb.ForwardRequest:
        request = pb.ForwardRequest(
            endpoint=call.endpoint, need_vjp=need_vjp,
            args=codec.encode(tuple(call.args), writer, call.requires_grad, "args"),
            kwargs=codec.encode(dict(call.kwargs), writer, call.requires_grad, "kwargs"))
        if call.parameters is not None:
            request.parameters.CopyFrom(
                codec.encode(call.parameters, writer, call.requires_grad, "parameters"))
        return request

    # -- plumbing ----------------------------------------------------------
    def _stream(self, method: Any, frame_type: type, request: Any, writer: FrameWriter,
                session: Session | None, timeout: float | None) -> tuple[Any, FrameReader]:
        """Send a framed request; returns the reply header and the reader holding its payloads."""
        peers = session.peers if session is not None else ()
        reader = FrameReader(self.max_receive_bytes, peers_for=lambda header: peers)
        frames = method(writer.frames(frame_type, request), timeout=self._deadline(timeout))
        header = self._read(reader, frames)
        if reader.spilled:   # the reply arena was full: grow it for the next calls
            session.grow(reader.spilled, len(session.shm.segments))
        return header, reader

    def _in_session(self, call: Callable[[], Any]) -> Any:
        """Run a call; if the server lost our shared-memory session (a restart), reopen it once."""
        try:
            return call()
        except SessionMissing:
            if self._session is None:
                raise
            log.info("gradserve: shared-memory session lost (server restarted?); reopening")
            self._session = self._open_session(cuda=self.transport == "cuda_ipc")
            self.transport = "cuda_ipc" if self._session.cuda is not None else "shm"
            return call()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        if method is not self._stub.Release:
            self._flush_releases(timeout)
        try:
            return method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    @staticmethod
    def _read(reader: FrameReader, frames: Any) -> Any:
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
        """Send queued releases (and freed reply slots); on failure keep the ids queued."""
        ids = self._take_releases()
        session = self._session
        freed = session is not None and session.has_freed()
        if ids or freed:
            request = pb.ReleaseRequest(residual_ids=ids)
            if session is not None:
                request.session.CopyFrom(session.state())
            try:
                self._unary(self._stub.Release, request, timeout)
            except RemoteError:
                self._released.extend(ids)


def connect(address: str, **options: Any) -> Client:
    """Open a :class:`Client` to the gradserve server at ``host:port``."""
    return Client(address, **options)
