"""The ``gradserve.v1.Gradserve`` servicer: RPCs onto the registry and the residual store.

Every handler turns failures into a precise status: ``StatusError`` keeps its
code; any other exception is INTERNAL with its type and message (and the
traceback only when ``debug`` is on). No input can take the server down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from gradserve import codec
from gradserve.errors import REASON_KEY, RESIDUAL_MISSING, StatusError, invalid
from gradserve.server.registry import Endpoint, Registry
from gradserve.server.residuals import ResidualStore
from gradserve.server.sessions import SessionManager
from gradserve.transport.bytes import FrameReader, FrameWriter
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

log = logging.getLogger("gradserve.server")


@dataclass(frozen=True)
class Limits:
    chunk_bytes: int          # largest chunk this server sends
    max_request_bytes: int    # most tensor bytes one request may carry
    idle_seconds: float       # a request stream silent this long is cancelled


#: Signature results kept, across endpoints (input signatures seen most recently).
SIGNATURE_CACHE_SIZE = 256
#: Calls larger than this (inline tensors) are not kept as signature cache keys.
SIGNATURE_KEY_BYTES = 64 << 10


class IdleWatch:
    """Cancels request streams that stop sending, so they cannot pin worker threads."""

    def __init__(self, idle_seconds: float):
        self.idle_seconds = idle_seconds
        self._last: dict[grpc.ServicerContext, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradserve-idle", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, context: grpc.ServicerContext) -> Iterator[Callable[[], None]]:
        """While reading a request: yields the function to call on every frame."""
        def touch() -> None:
            self._last[context] = time.monotonic()

        with self._lock:
            touch()
        try:
            yield touch
        finally:
            with self._lock:
                self._last.pop(context, None)

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(min(1.0, self.idle_seconds / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [c for c, t in self._last.items() if now - t > self.idle_seconds]
            for context in idle:
                log.warning("cancelling %s: request stream idle for over %.1f s",
                            context.peer(), self.idle_seconds)
                context.cancel()


class GradserveService(pb_grpc.GradserveServicer):
    def __init__(self, registry: Registry, residuals: ResidualStore, sessions: SessionManager,
                 limits: Limits, debug: bool = False):
        self.registry = registry
        self.residuals = residuals
        self.sessions = sessions
        self.limits = limits
        self.debug = debug
        self._signatures: OrderedDict[bytes, pb.Value] = OrderedDict()
        self._signatures_lock = threading.Lock()
        self.idle = IdleWatch(limits.idle_seconds)

    # -- discovery ---------------------------------------------------------
    def ListEndpoints(self, request: pb.ListEndpointsRequest, context: grpc.ServicerContext):
        with self._status(context):
            return pb.ListEndpointsResponse(endpoints=[e.info() for e in self.registry.all()])

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext):
        with self._status(context):
            endpoint = self.registry.get(request.endpoint)
            return pb.DescribeResponse(endpoint=endpoint.info(),
                                       residuals=self.residuals.stats(endpoint.name))

    def GetParameters(self, request: pb.GetParametersRequest, context: grpc.ServicerContext):
        with self._status(context):
            endpoint = self.registry.get(request.endpoint)
            writer = FrameWriter(self.limits.chunk_bytes)
            header = codec.encode(endpoint.parameters(), writer, path="parameters")
        yield from writer.frames(pb.GetParametersFrame, header)

    def Signature(self, request: pb.SignatureRequest, context: grpc.ServicerContext):
        with self._status(context):
            endpoint = self.registry.get(request.call.endpoint)
            call = pb.ForwardRequest(endpoint=endpoint.name, args=request.call.args,
                                     kwargs=request.call.kwargs)
            if request.call.HasField("parameters"):
                call.parameters.CopyFrom(request.call.parameters)
            key = call.SerializeToString(deterministic=True)
            key = key if len(key) <= SIGNATURE_KEY_BYTES else None
            with self._signatures_lock:
                outputs = self._signatures.get(key) if key else None
                if outputs is not None:
                    self._signatures.move_to_end(key)
            if outputs is None:
                reader = FrameReader(self.limits.max_request_bytes)
                call = reader.read([pb.ForwardFrame(header=call)])
                args, kwargs, parameters = self._inputs(endpoint, call, reader, abstract=True)
                specs = endpoint.signature(args, kwargs, parameters)
                outputs = codec.encode(specs, FrameWriter(inline_bytes=1 << 62), path="outputs")
                with self._signatures_lock:
                    if key:
                        self._signatures[key] = outputs
                    while len(self._signatures) > SIGNATURE_CACHE_SIZE:
                        self._signatures.popitem(last=False)
            return pb.SignatureResponse(outputs=outputs)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext):
        with self._status(context):
            if request.HasField("session"):
                self.sessions.peers(request.session)   # frees the reported reply slots
            return pb.ReleaseResponse(released=self.residuals.release(list(request.residual_ids)))

    # -- shared-memory sessions --------------------------------------------
    def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.ServicerContext):
        with self._status(context):
            return self.sessions.open(request)

    def ConfirmSession(self, request: pb.ConfirmSessionRequest, context: grpc.ServicerContext):
        with self._status(context):
            return self.sessions.confirm(request)

    def GrowSession(self, request: pb.GrowSessionRequest, context: grpc.ServicerContext):
        with self._status(context):
            return self.sessions.grow(request)

    def KeepAlive(self, request: pb.SessionRequest, context: grpc.ServicerContext):
        with self._status(context):
            return pb.SessionResponse(open=self.sessions.keep_alive(request.session_id))

    def CloseSession(self, request: pb.SessionRequest, context: grpc.ServicerContext):
        with self._status(context):
            self.sessions.close(request.session_id)
            return pb.SessionResponse(open=False)

    def _peers_for(self, header: Any) -> list:
        return self.sessions.peers(header.session) if header.HasField("session") else []

    # -- differentiable calls ----------------------------------------------
    def Forward(self, request_iterator: Iterator[pb.ForwardFrame], context: grpc.ServicerContext):
        def run(request: pb.ForwardRequest, reader: FrameReader, writer: FrameWriter) -> tuple:
            if request.release:
                self.residuals.release(list(request.release))
            endpoint = self.registry.get(request.endpoint)
            outputs, residual, nbytes = self._forward(endpoint, request, reader)
            rid = self.residuals.put(endpoint.name, residual, nbytes) if residual is not None else ""
            reply = pb.ForwardResponse(outputs=codec.encode(outputs, writer, path="outputs"),
                                       residual_id=rid)
            return reply, (outputs, residual)

        yield from self._framed(request_iterator, context, pb.ForwardReplyFrame, run)

    def Vjp(self, request_iterator: Iterator[pb.VjpFrame], context: grpc.ServicerContext):
        def run(request: pb.VjpRequest, reader: FrameReader, writer: FrameWriter) -> tuple:
            endpoint = self.registry.get(request.endpoint)
            residual = self._residual_for(endpoint, request, reader)
            cotangents = codec.decode(request.cotangents, reader, endpoint.make_leaf, "cotangents")
            grads = endpoint.vjp(residual, cotangents, request.batched_cotangents)
            reply = pb.VjpResponse(**{part: codec.encode(g, writer, path=part)
                                      for part, g in zip(("args", "kwargs", "parameters"), grads)})
            return reply, (grads, cotangents, residual)

        yield from self._framed(request_iterator, context, pb.VjpReplyFrame, run)

    def _framed(self, request_iterator: Iterator[Any], context: grpc.ServicerContext,
                reply_frame: type, run: Callable[..., tuple]) -> Iterator[Any]:
        """Read a framed request (watched for idleness), ``run`` it, stream the reply.

        ``run(request, reader, writer)`` returns the reply header and what the
        call made; that, the request and its payloads are freed in the
        background, not while the client waits for its reply.
        """
        reply = None
        with self._status(context), self.idle.watching(context) as touch:
            reader = FrameReader(self.limits.max_request_bytes, touch, self._peers_for)
            request = reader.read(request_iterator)
            writer = FrameWriter(self.limits.chunk_bytes, peers=reader.peers)
            reply, made = run(request, reader, writer)
            self.residuals.dropper.drop((made, reader, request))
            del made, reader, request
        if reply is not None:
            yield from writer.frames(reply_frame, reply)

    def _residual_for(self, endpoint: Endpoint, request: pb.VjpRequest, reader: FrameReader) -> Any:
        if request.residual_id:
            held = self.residuals.get(request.residual_id)
            if held is not None:
                owner, residual = held
                if owner != endpoint.name:
                    raise invalid(f"residual {request.residual_id!r} belongs to endpoint "
                                  f"{owner!r}, not {endpoint.name!r}")
                return residual
        if not request.HasField("inputs"):
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"residual {request.residual_id!r} is not held by this server "
                              "(released, evicted, expired, or kept by another replica); "
                              "resend the inputs to recompute", RESIDUAL_MISSING)
        if request.inputs.endpoint not in ("", endpoint.name):
            raise invalid(f"inputs name endpoint {request.inputs.endpoint!r}, "
                          f"not {endpoint.name!r}")
        _, residual, _ = self._forward(endpoint, request.inputs, reader, need_vjp=True)
        if residual is None:
            raise invalid("no input of the re-sent call requires grad")
        return residual

    @classmethod
    def _forward(cls, endpoint: Endpoint, request: pb.ForwardRequest, reader: FrameReader,
                 need_vjp: bool | None = None) -> tuple[Any, Any, int]:
        args, kwargs, parameters = cls._inputs(endpoint, request, reader)
        return endpoint.forward(args, kwargs, parameters,
                                request.need_vjp if need_vjp is None else need_vjp)

    @staticmethod
    def _inputs(endpoint: Endpoint, request: pb.ForwardRequest, reader: FrameReader,
                abstract: bool = False) -> tuple[tuple, dict, Any]:
        def part(name: str) -> Any:
            return codec.decode(getattr(request, name), reader, endpoint.make_leaf, name, abstract)

        args, kwargs = part("args"), part("kwargs")
        args = () if args is None else args
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise invalid("args must be a tuple and kwargs a dict")
        parameters = part("parameters") if request.HasField("parameters") else None
        return args, kwargs, parameters

    # -- errors ------------------------------------------------------------
    @contextlib.contextmanager
    def _status(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Run a handler body, aborting the RPC with the right status on failure."""
        failure = None
        try:
            yield
        except StatusError as err:
            failure = err
        except Exception as err:  # a bug or an unexpected input: never kill the server
            if not context.is_active():
                return  # cancelled (idle, or by the client): nobody to answer
            log.exception("unexpected error in %s", context.peer())
            message = f"{type(err).__name__}: {err}"
            if self.debug:
                message += "\n" + traceback.format_exc()
            failure = StatusError(grpc.StatusCode.INTERNAL, message)
        if failure is not None:
            if failure.reason:
                context.set_trailing_metadata(((REASON_KEY, failure.reason),))
            context.abort(failure.code, failure.message)
