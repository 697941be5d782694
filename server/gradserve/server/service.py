"""The ``gradserve.v1.Gradserve`` servicer: RPCs onto the registry and the residual store.

Every handler turns failures into a precise status: ``StatusError`` keeps its
code; any other exception is INTERNAL with its type and message (and the
traceback only when ``debug`` is on). No input can take the server down.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
from grpc_status import rpc_status

from gradserve.errors import DRAINING, REASON_KEY, REPLY_TOO_LARGE, RESIDUAL_MISSING, StatusError, \
    clip_status, invalid, shown
from gradserve.lru import LRU
from gradserve.security import CLIENT_KEY
from gradserve.server.auth import Tokens
from gradserve.server.batching import Batcher, Recorder, is_share
from gradserve.server.endpoint import Endpoint, Residual
from gradserve.server.instances import Instances
from gradserve.server.metrics import CallRecord, Observer, trace_call
from gradserve.server.registry import Registry
from gradserve.server.residuals import ResidualStore
from gradserve.server.sessions import ServerSession, SessionManager
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire import codec
from gradserve.wire.codec import Arguments
from gradserve.wire.framing import FrameReader, FrameWriter
from gradserve.wire.specs import PROCESS

log = logging.getLogger("gradserve.server")


@dataclass(frozen=True)
class Limits:
    """The server's bounds on calls: ``Server``'s keywords of the same names."""

    chunk_bytes: int                 # largest chunk this server sends
    max_request_bytes: int           # most tensor bytes one request may carry
    idle_timeout: float              # a stream that moves nothing this long is cancelled
    max_request_values: int          # most pytree nodes one request may hold
    workers: int                     # forwards and backwards running at once
    max_streams: int                 # Forward/Vjp/GetParameters streams open at once
    max_streams_per_peer: int        # of them, those one connection may hold open
    min_stream_rate: float           # bytes/s a connection must average past idle_timeout
    max_inflight_bytes: int          # request bytes all calls together may hold


#: Calls moving fewer tensor bytes than this free what they made at once; larger ones
#: leave it to the background dropper (a hand-off costs more than freeing a little).
DROP_BYTES = 1 << 20
#: A writer budget that puts every payload inline.
UNLIMITED = 1 << 62
#: The inline bytes a one-message reply may carry, in chunks (more: the client streams).
ONE_MESSAGE_CHUNKS = 4
#: Signature results kept, across endpoints (input signatures seen most recently).
SIGNATURE_CACHE_SIZE = 256
#: Calls larger than this (inline tensors) are not kept as signature cache keys.
SIGNATURE_KEY_BYTES = 64 << 10


class StreamWatch:
    """Cancels streams that stall, so they cannot pin worker threads: reading a request or
    draining a reply, a stream is cancelled when no frame moved for ``idle_seconds``, or
    when, past its first ``idle_seconds``, its connection's streams together averaged fewer
    than ``min_rate`` bytes a second (one byte now and then does not keep it alive; many
    streams sharing one link are judged together). Running the model is not watched."""

    def __init__(self, idle_seconds: float, min_rate: float):
        self.idle_seconds = idle_seconds
        self.min_rate = min_rate
        self._watched: dict[grpc.ServicerContext, list[float]] = {}   # start, last, bytes
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching."""
        if self._thread is None:
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name="gradserve-idle", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching (and end the thread)."""
        self._stopped.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    @contextlib.contextmanager
    def watching(self, context: grpc.ServicerContext) -> Iterator[Callable[[int], None]]:
        """While a stream moves: yields the function to call with each frame's bytes."""
        now = time.monotonic()
        entry = [now, now, 0.0]

        def touch(nbytes: int) -> None:
            entry[1] = time.monotonic()
            entry[2] += nbytes

        with self._lock:
            self._watched[context] = entry
        try:
            yield touch
        finally:
            with self._lock:
                self._watched.pop(context, None)

    def _run(self) -> None:
        while not self._stopped.wait(min(1.0, self.idle_seconds / 4)):
            now = time.monotonic()
            with self._lock:
                watched = list(self._watched.items())
            rates: dict[str, tuple[float, float]] = {}   # peer -> (bytes, longest elapsed)
            peers = {}
            for context, (started, _, nbytes) in watched:
                peer = peers[context] = context.peer()
                total, longest = rates.get(peer, (0.0, 0.0))
                rates[peer] = (total + nbytes, max(longest, now - started))
            for context, entry in watched:
                started, last, nbytes = entry
                total, longest = rates[peers[context]]
                idle = now - last > self.idle_seconds
                slow = (now - started > self.idle_seconds
                        and total / max(longest, 1e-9) < self.min_rate)
                if not (idle or slow):
                    continue
                with self._lock:
                    if self._watched.get(context) is not entry:
                        continue   # it moved on to its next phase meanwhile
                log.warning("cancelling a stream of %s: %.0f bytes in %.1f s, last frame %.1f "
                            "s ago (limits: %.1f s idle, %.0f bytes/s a connection)",
                            peers[context], nbytes, now - started, now - last,
                            self.idle_seconds, self.min_rate)
                context.cancel()


class OneMessageWatch(grpc.ServerInterceptor):
    """Serves every method whose request is one message (unary ones, GetParameters, health
    checks) as a request stream of one, read under ``watch``: a request that never arrives
    is cancelled like a stalled stream, instead of holding a thread while its client waits."""

    def __init__(self, watch: StreamWatch):
        self.watch = watch

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        behavior = handler.unary_stream or handler.unary_unary
        make = (grpc.stream_stream_rpc_method_handler if handler.response_streaming
                else grpc.stream_unary_rpc_method_handler)
        return make(lambda requests, context: behavior(self._read(requests, context), context),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _read(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self.watch.watching(context):
            try:
                request = next(requests, None)
            except grpc.RpcError:   # cancelled while it waited
                request = None
        if request is None:
            context.abort(grpc.StatusCode.CANCELLED if not context.is_active() else
                          grpc.StatusCode.INVALID_ARGUMENT, "the call sent no request")
        return request


class InFlight:
    """Request bytes all calls together hold while they are read and run (a stream's
    buffers, inline payloads), bounded: a request past it is refused."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Hold ``nbytes`` more; RESOURCE_EXHAUSTED when they would pass the limit."""
        with self._lock:
            if self._held + nbytes > self.limit:
                raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"the server holds {self._held} bytes of requests, and "
                                  f"{nbytes} more would pass its limit of {self.limit}")
            self._held += nbytes

    def give(self, nbytes: int) -> None:
        """Return bytes ``take`` held."""
        with self._lock:
            self._held -= nbytes

    @property
    def held(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._held


#: The ``ErrorInfo.domain`` of gradserve's errors.
ERROR_DOMAIN = "gradserve.v1"
#: Where an INVALID_ARGUMENT message names the field it is about: ``args[0]: ...``,
#: ``parameters['0.weight']: ...``, ``argument 'x': ...``.
_FIELD = re.compile(r"^((?:args|kwargs|parameters|cotangents|inputs)\S*?|argument '[^']+'): (.+)",
                    re.S)


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def rich_status(failure: StatusError) -> grpc.Status:
    """``failure`` as the standard rich error model (``google.rpc.Status`` with an
    ``ErrorInfo``, and a ``BadRequest.FieldViolation`` naming the argument where the
    message does) plus gradserve's own ``gradserve-reason`` trailer."""
    message = clip_status(failure.message)
    detail = status_pb2.Status(code=failure.code.value[0], message=message)
    reason = (failure.reason or failure.code.name).upper().replace("-", "_")
    detail.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    found = _FIELD.match(failure.message)
    if failure.code == grpc.StatusCode.INVALID_ARGUMENT and found:
        detail.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=clip_status(found.group(1), 200),
                description=clip_status(found.group(2), 500))]))
    standard = rpc_status.to_status(detail)
    trailers = tuple(standard.trailing_metadata)
    if failure.reason:
        trailers += ((REASON_KEY, failure.reason),)
    return _Status(standard.code, standard.details, trailers)


class GradserveService(pb_grpc.GradserveServicer):
    """The RPC handlers."""

    def __init__(self, registry: Registry, residuals: ResidualStore, sessions: SessionManager,
                 limits: Limits, debug: bool = False, auth: Tokens | None = None,
                 observer: Observer | None = None):
        self.registry = registry
        #: counts, times and logs every call (and serves the metrics, if started)
        self.observer = observer if observer is not None else Observer()
        #: the tokens calls must carry (None: no auth)
        self.auth = auth
        self.residuals = residuals
        self.sessions = sessions
        self.limits = limits
        self.debug = debug
        #: Signature results by the request's bytes (``clear()`` forgets them)
        self.signatures: LRU[bytes, pb.Value] = LRU(SIGNATURE_CACHE_SIZE)
        self.watch = StreamWatch(limits.idle_timeout, limits.min_stream_rate)
        #: request bytes all calls together hold now (bounded by ``max_inflight_bytes``)
        self.inflight = InFlight(limits.max_inflight_bytes)
        self._running = threading.BoundedSemaphore(limits.workers)
        self._batchers: dict[tuple[str, int], Batcher] = {}
        self._streams: collections.Counter[str] = collections.Counter()
        self._streams_lock = threading.Lock()
        #: set by ``drain``: new Forwards, recomputes and sessions are refused
        self.draining = False

    def drain(self) -> None:
        """Take no new work: Forwards, Vjps that would recompute and new sessions are refused
        (UNAVAILABLE, reason ``draining``); Vjps of residuals held here still run."""
        self.draining = True

    def _refuse_if_draining(self, what: str) -> None:
        if self.draining:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"this server is shutting down and "
                              f"takes no new {what}: send it to another replica", DRAINING)

    def active_streams(self, peer: str | None = None) -> int:
        """Forward/Vjp/GetParameters streams open now (of one peer, if named)."""
        with self._streams_lock:
            return self._streams[peer] if peer is not None else sum(self._streams.values())

    def _identify(self, context: grpc.ServicerContext, call: CallRecord) -> None:
        """Who makes the call, found once for all it does: with auth, its token (the
        principal, and the owner of its sessions and residuals); without, the per-client
        secret its client sends (never logged; "" for a client sending none)."""
        metadata = context.invocation_metadata()
        if self.auth is not None:
            call.token = self.auth.find(metadata)
            call.principal = call.token.name if call.token is not None else ""
            call.owner = f"token:{call.principal}" if call.token is not None else ""
        else:
            call.owner = next((str(v) for k, v in metadata or () if k == CLIENT_KEY), "")

    def _counted_as(self, call: CallRecord) -> str:
        """What per-connection limits count by: the token with auth, else the connection."""
        return call.owner if self.auth is not None else call.peer

    def _known(self, name: str) -> str:
        """``name`` if this server hosts such an endpoint, else "?": what metrics and logs
        show (a client's made-up names must not grow them)."""
        return name if name and self.registry.has(name) else ("?" if name else "")

    def _allow(self, call: CallRecord, *, endpoint: str | None = None,
               parameters: bool = False, sessions: bool = False) -> None:
        """PERMISSION_DENIED unless the call's token allows what it does (no auth: all)."""
        if self.auth is not None:
            Tokens.require(call.token, endpoint=endpoint, parameters=parameters,
                           sessions=sessions)

    # -- discovery ---------------------------------------------------------
    def ListEndpoints(self, request: pb.ListEndpointsRequest,
                      context: grpc.ServicerContext) -> pb.ListEndpointsResponse:
        with self._status(context, "ListEndpoints") as call:
            token = Tokens.require(call.token) if self.auth is not None else None
            return pb.ListEndpointsResponse(endpoints=[
                g.info() for g in self.registry.groups()
                if token is None or token.may_call(g.primary.name)])
        return pb.ListEndpointsResponse()

    def Describe(self, request: pb.DescribeRequest,
                 context: grpc.ServicerContext) -> pb.DescribeResponse:
        with self._status(context, "Describe", request.endpoint) as call:
            self._allow(call, endpoint=request.endpoint)
            group = self.registry.instances(request.endpoint)
            name = group.primary.name
            reply = pb.DescribeResponse(endpoint=group.info(),
                                        residuals=self.residuals.stats(name),
                                        instances=group.stats(), process=PROCESS)
            if self.batcher(group.primary) is not None:
                reply.batches.CopyFrom(self.batch_stats().get(name, pb.BatchStats()))
            return reply
        return pb.DescribeResponse()

    def GetParameters(self, request: pb.GetParametersRequest,
                      context: grpc.ServicerContext) -> Iterator[pb.GetParametersFrame]:
        def frames(call: CallRecord) -> Iterator[pb.GetParametersFrame]:
            self._allow(call, endpoint=request.endpoint, parameters=True)
            endpoint = self.registry.get(request.endpoint)
            writer = FrameWriter(self.limits.chunk_bytes)
            header = codec.encode(endpoint.parameters(), writer, path="parameters")
            call.bytes_out = writer.nbytes
            return writer.frames(pb.GetParametersFrame, header)

        yield from self._streamed(context, "GetParameters", frames, request.endpoint)

    def Signature(self, request: pb.SignatureRequest,
                  context: grpc.ServicerContext) -> pb.SignatureResponse:
        with self._status(context, "Signature", request.call.endpoint) as record:
            self._allow(record, endpoint=request.call.endpoint)
            endpoint = self.registry.get(request.call.endpoint)
            call = pb.ForwardRequest(endpoint=endpoint.name, args=request.call.args,
                                     kwargs=request.call.kwargs)
            if request.call.HasField("parameters"):
                call.parameters.CopyFrom(request.call.parameters)
            key = call.SerializeToString(deterministic=True)
            cacheable = len(key) <= SIGNATURE_KEY_BYTES
            outputs = self.signatures.get(key) if cacheable else None
            if outputs is None:
                reader: FrameReader[Any] = FrameReader(self.limits.max_request_bytes,
                                                       max_values=self.limits.max_request_values)
                call = reader.read_header(call)
                inputs = codec.decode_arguments(call, reader, endpoint.make_leaf, abstract=True,
                                                statics=endpoint)
                with self._running:   # a fake-tensor trace, a compile, or a dry run
                    types = endpoint.signature(inputs)
                outputs = codec.encode(types, FrameWriter(inline_bytes=UNLIMITED), path="outputs")
                if cacheable:
                    self.signatures.put(key, outputs)
            return pb.SignatureResponse(outputs=outputs)
        return pb.SignatureResponse()

    def Release(self, request: pb.ReleaseRequest,
                context: grpc.ServicerContext) -> pb.ReleaseResponse:
        with self._status(context, "Release") as call:
            released = self.residuals.release(list(request.residual_ids), call.owner)
            if request.HasField("session"):   # frees the reported reply slots, if it is held
                self.sessions.free(request.session, call.owner)
            return pb.ReleaseResponse(released=released)
        return pb.ReleaseResponse()

    # -- same-host sessions ------------------------------------------------
    def OpenSession(self, request: pb.OpenSessionRequest,
                    context: grpc.ServicerContext) -> pb.OpenSessionResponse:
        with self._status(context, "OpenSession") as call:
            self._allow(call, sessions=True)
            self._refuse_if_draining("sessions")
            return self.sessions.open(request, self._counted_as(call), call.owner)
        return pb.OpenSessionResponse()

    def ConfirmSession(self, request: pb.ConfirmSessionRequest,
                       context: grpc.ServicerContext) -> pb.ConfirmSessionResponse:
        with self._status(context, "ConfirmSession") as call:
            self._allow(call, sessions=True)
            return self.sessions.confirm(request, call.owner)
        return pb.ConfirmSessionResponse()

    def GrowSession(self, request: pb.GrowSessionRequest,
                    context: grpc.ServicerContext) -> pb.GrowSessionResponse:
        with self._status(context, "GrowSession") as call:
            self._allow(call, sessions=True)
            return self.sessions.grow(request, call.owner)
        return pb.GrowSessionResponse()

    def KeepAlive(self, request: pb.SessionRequest,
                  context: grpc.ServicerContext) -> pb.SessionResponse:
        with self._status(context, "KeepAlive") as call:
            return pb.SessionResponse(open=self.sessions.keep_alive(request.session_id,
                                                                    call.owner))
        return pb.SessionResponse()

    def CloseSession(self, request: pb.SessionRequest,
                     context: grpc.ServicerContext) -> pb.SessionResponse:
        with self._status(context, "CloseSession") as call:
            self.sessions.close(request.session_id, call.owner)
            return pb.SessionResponse(open=False)
        return pb.SessionResponse()

    def _slots_for(self, header: Any, owner: str) -> ServerSession | None:
        return self.sessions.slots(header.session, owner) if header.HasField("session") else None

    # -- differentiable calls ----------------------------------------------
    def batch_stats(self) -> dict[str, pb.BatchStats]:
        """What the batchers made so far did, by endpoint name (summed over its instances)."""
        with self._streams_lock:
            batchers = list(self._batchers.items())
        found: dict[str, pb.BatchStats] = {}
        for (name, _), batcher in batchers:
            stats, total = batcher.stats(), found.setdefault(name, pb.BatchStats())
            for field in ("forward_runs", "forward_calls", "forward_rows", "vjp_runs",
                          "vjp_calls", "queue_seconds"):
                setattr(total, field, getattr(total, field) + getattr(stats, field))
            total.max_calls = max(total.max_calls, stats.max_calls)
        return found

    def batcher(self, endpoint: Endpoint, merging: bool = True) -> Batcher | None:
        """The endpoint's dynamic batcher (None: it does not merge calls; ``merging=False``:
        its batcher all the same, for the Vjp of a share of a merged run)."""
        if merging and (not endpoint.batchable or endpoint.max_batch < 2):
            return None
        key = (endpoint.name, endpoint.instance)
        with self._streams_lock:
            batcher = self._batchers.get(key)
            if batcher is None or batcher.endpoint is not endpoint:
                batcher = self._batchers[key] = Batcher(endpoint, self._running)
            return batcher

    @contextlib.contextmanager
    def _turn(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Run the model among at most ``workers`` runs at once, unless the client left
        while its call waited (CANCELLED, which is not sent)."""
        with self._running:
            if not context.is_active():
                raise StatusError(grpc.StatusCode.CANCELLED, "the client left")
            yield

    def _forward(self, request: pb.ForwardRequest, reader: FrameReader[Any],
                 writer: FrameWriter, context: grpc.ServicerContext, call: CallRecord
                 ) -> tuple[pb.ForwardResponse, Any]:
        """The body of Forward and ForwardUnary."""
        self._allow(call, endpoint=request.endpoint)
        owner = call.owner
        if request.release:
            self.residuals.release(list(request.release), owner)
        self._refuse_if_draining("Forward calls")
        with self.registry.instances(request.endpoint).running("forward") as endpoint:
            batcher = self.batcher(endpoint)
            made = None
            if batcher is not None:
                recorder = Recorder(endpoint)
                inputs = codec.decode_arguments(request, reader, recorder, statics=endpoint)
                made = batcher.forward(inputs, recorder, request.need_vjp, call.peer)
            else:
                inputs = self._inputs(endpoint, request, reader)
            if made is None:
                with self._turn(context):
                    made = endpoint.forward(inputs, request.need_vjp)
        if made.residual is not None:
            made.residual.instance = endpoint.instance
        rid = (self._store(endpoint.name, made.residual, made.nbytes, reader, owner)
               if made.residual is not None else "")
        trace_call(endpoint.name, rid)
        reply = pb.ForwardResponse(residual_id=rid)
        try:
            self._send(reply.outputs, made.outputs, writer, endpoint.name, "outputs")
        except StatusError:
            if rid:
                self.residuals.release([rid], owner)
            raise
        return reply, made

    def _store(self, name: str, residual: Residual, nbytes: int, reader: FrameReader[Any],
               owner: str) -> str:
        """Keep a residual of endpoint ``name`` for a later Vjp: its id ("" when the session
        whose memory it views ended while it was made; it then goes with the session)."""
        slots = reader.slots if reader.used_slots else None
        # it keeps the request's static values too (a long string, say)
        rid = self.residuals.put(name, residual, nbytes, slots.id if slots is not None else "",
                                 owner, structure=reader.structure_bytes)
        if slots is not None and slots.closed:   # it ended while this ran
            self.residuals.release([rid], owner)
            return ""
        return rid

    @staticmethod
    def _send(target: pb.Value, tree: Any, writer: FrameWriter, name: str, path: str) -> None:
        """Encode what endpoint ``name`` returned into ``target``; INTERNAL naming the part
        that has no wire form (the endpoint's fault)."""
        try:
            codec.encode_into(target, tree, writer, path=path)
        except TypeError as err:
            raise StatusError(grpc.StatusCode.INTERNAL,
                              f"endpoint {name!r} returned what cannot be sent: {err}") from None

    def _vjp(self, request: pb.VjpRequest, reader: FrameReader[Any], writer: FrameWriter,
             context: grpc.ServicerContext, call: CallRecord) -> tuple[pb.VjpResponse, Any]:
        """The body of Vjp and VjpUnary."""
        self._allow(call, endpoint=request.endpoint)
        group = self.registry.instances(request.endpoint)
        trace_call(group.primary.name, request.residual_id)
        residual = self._residual_for(group, request, reader, context, call.owner)
        kept: Residual | None = None
        kept_bytes = 0
        with group.running("vjp", residual.instance) as endpoint:   # where its tensors are
            cotangents = codec.decode(request.cotangents, reader, endpoint.make_leaf,
                                      "cotangents", statics=endpoint)
            batcher = self.batcher(endpoint, merging=False) if is_share(residual) else None
            if request.keep_graph:
                with self._turn(context):
                    made = endpoint.vjp_kept(residual, cotangents, request.batched_cotangents)
                grads, kept, kept_bytes = Arguments(*made.outputs), made.residual, made.nbytes
            elif batcher is not None:
                grads = batcher.vjp(residual, cotangents, request.batched_cotangents, call.peer)
            else:
                with self._turn(context):
                    grads = endpoint.vjp(residual, cotangents, request.batched_cotangents)
        reply = pb.VjpResponse()
        if kept is not None:
            reply.residual_id = self._store(endpoint.name, kept, kept_bytes, reader, call.owner)
        codec.encode_arguments(grads, writer, reply)
        return reply, (grads, cotangents, residual, kept)

    def _jvp(self, request: pb.JvpRequest, reader: FrameReader[Any], writer: FrameWriter,
             context: grpc.ServicerContext, call: CallRecord) -> tuple[pb.JvpResponse, Any]:
        """The body of Jvp and JvpUnary."""
        self._allow(call, endpoint=request.endpoint)
        self._refuse_if_draining("Jvp calls")
        with self.registry.instances(request.endpoint).running("forward") as endpoint:
            inputs = self._inputs(endpoint, request, reader)
            tangents = codec.decode_arguments(request.tangents, reader, endpoint.make_leaf,
                                              statics=endpoint)
            with self._turn(context):
                outputs, out_tangents = endpoint.jvp(inputs, tangents, request.batched_tangents)
        reply = pb.JvpResponse()
        self._send(reply.outputs, outputs, writer, endpoint.name, "outputs")
        self._send(reply.tangents, out_tangents, writer, endpoint.name, "tangents")
        return reply, (outputs, out_tangents)

    def Jvp(self, request_iterator: Iterator[pb.JvpFrame],
            context: grpc.ServicerContext) -> Iterator[pb.JvpReplyFrame]:
        yield from self._streamed(context, "Jvp", lambda call: self._reply(
            request_iterator, context, pb.JvpReplyFrame, self._jvp, call))

    def JvpUnary(self, request: pb.JvpRequest, context: grpc.ServicerContext) -> pb.JvpResponse:
        found: pb.JvpResponse = (self._unary(request, context, "JvpUnary", self._jvp)
                                 or pb.JvpResponse())
        return found

    def Forward(self, request_iterator: Iterator[pb.ForwardFrame],
                context: grpc.ServicerContext) -> Iterator[pb.ForwardReplyFrame]:
        yield from self._streamed(context, "Forward", lambda call: self._reply(
            request_iterator, context, pb.ForwardReplyFrame, self._forward, call))

    def Vjp(self, request_iterator: Iterator[pb.VjpFrame],
            context: grpc.ServicerContext) -> Iterator[pb.VjpReplyFrame]:
        yield from self._streamed(context, "Vjp", lambda call: self._reply(
            request_iterator, context, pb.VjpReplyFrame, self._vjp, call))

    def ForwardUnary(self, request: pb.ForwardRequest,
                     context: grpc.ServicerContext) -> pb.ForwardResponse:
        found: pb.ForwardResponse = (self._unary(request, context, "ForwardUnary",
                                                 self._forward) or pb.ForwardResponse())
        return found

    def VjpUnary(self, request: pb.VjpRequest, context: grpc.ServicerContext) -> pb.VjpResponse:
        found: pb.VjpResponse = (self._unary(request, context, "VjpUnary", self._vjp)
                                 or pb.VjpResponse())
        return found

    def _streamed(self, context: grpc.ServicerContext, method: str,
                  make: Callable[[CallRecord], Iterator[Any] | None],
                  endpoint: str = "") -> Iterator[Any]:
        """A streaming call: admitted (within ``max_streams`` and ``max_streams_per_peer``)
        while it lasts, its reply frames made by ``make`` (None: none to send), then sent
        watched, so a client that stops reading is cancelled."""
        with contextlib.ExitStack() as admission:   # held while the frames are sent
            frames = None
            with self._status(context, method, endpoint) as call:
                self._admit(admission, call)
                frames = make(call)
            if frames is not None:
                with self.watch.watching(context) as touch:
                    try:
                        for frame in frames:
                            touch(frame.ByteSize())
                            yield frame
                    except StatusError as err:   # the payloads sent out of band were not taken
                        context.abort_with_status(rich_status(err))

    def _admit(self, admission: contextlib.ExitStack, call: CallRecord) -> None:
        """Count the call among the open streams until ``admission`` closes;
        RESOURCE_EXHAUSTED when that would pass a limit."""
        refusal = admission.enter_context(self._admitted(self._counted_as(call)))
        if refusal:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)

    @contextlib.contextmanager
    def _admitted(self, peer: str) -> Iterator[str]:
        """Count one stream of ``peer`` while it lasts; yields why it is refused ("" when it
        is not): past ``max_streams_per_peer`` or ``max_streams``."""
        with self._streams_lock:
            mine, total = self._streams[peer], sum(self._streams.values())
            refusal = ""
            if mine >= self.limits.max_streams_per_peer:
                refusal = (f"this connection has {mine} streaming calls open (Forward, Vjp, "
                           "GetParameters), the limit of one connection")
            elif total >= self.limits.max_streams:
                refusal = (f"this server has {total} streaming calls open (Forward, Vjp, "
                           "GetParameters), its limit")
            else:
                self._streams[peer] += 1
        try:
            yield refusal
        finally:
            if not refusal:
                with self._streams_lock:
                    self._streams[peer] -= 1
                    if not self._streams[peer]:
                        del self._streams[peer]

    def _reply(self, request_iterator: Iterator[Any], context: grpc.ServicerContext,
               reply_frame: type, run: Callable[..., tuple[Any, Any]],
               call: CallRecord) -> Iterator[Any] | None:
        """Read a framed request (watched) and ``run`` it; its reply frames, or None when
        its client left."""
        reader: FrameReader[ServerSession] = self._reader(call)
        context.add_callback(reader.drop_transfers)   # a cancelled call stops waiting
        with self.watch.watching(context) as touch:
            reader.on_frame = touch
            try:
                request = reader.read(request_iterator)
            except BaseException:
                reader.close()
                raise
        writer = FrameWriter(self.limits.chunk_bytes, slots=reader.slots)
        context.add_callback(writer.drop_transfers)
        reply = self._run(request, reader, writer, context, run, call)
        return writer.frames(reply_frame, reply, settle=True) if reply is not None else None

    def _unary(self, request: Any, context: grpc.ServicerContext, method: str,
               run: Callable[..., tuple[Any, Any]]) -> Any:
        """A one-message call: admitted like a stream, run like one; its reply carries every
        tensor inline or in a slot."""
        with contextlib.ExitStack() as admission:
            with self._status(context, method) as call:
                self._admit(admission, call)
                reader: FrameReader[ServerSession] = self._reader(call)
                context.add_callback(reader.drop_transfers)
                try:
                    request = reader.read_header(request)
                except BaseException:
                    reader.close()
                    raise
                room = ONE_MESSAGE_CHUNKS * self.limits.chunk_bytes
                writer = FrameWriter(self.limits.chunk_bytes, inline_bytes=room,
                                     slots=reader.slots, out_of_band=False)
                reply = self._run(request, reader, writer, context, run, call)
                if reply is not None and not writer.one_message:
                    self._unsent(reply, writer)
                    raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"the reply's tensors take {writer.nbytes} bytes, more "
                                      f"than one message carries ({room}): send this call "
                                      "streaming", REPLY_TOO_LARGE)
                if reply is not None:
                    writer.flush()
                    return reply
        return None

    def _reader(self, call: CallRecord) -> FrameReader[ServerSession]:
        owner = call.owner
        return FrameReader(self.limits.max_request_bytes, None,
                           lambda header: self._slots_for(header, owner),
                           self.limits.max_request_values, self.inflight)

    def _run(self, request: Any, reader: FrameReader[ServerSession], writer: FrameWriter,
             context: grpc.ServicerContext, run: Callable[..., tuple[Any, Any]],
             call: CallRecord) -> Any:
        """Run a read request (the model among at most ``workers`` runs at once); its reply
        header, or None when its client left. What a large call made, its request and its
        payloads are freed in the background, not while the client waits."""
        call.endpoint = self._known(request.endpoint)
        call.bytes_in = reader.nbytes
        if reader.slots is not None:
            call.transport = "+".join(t.name for t in reader.slots.transports)
        try:   # the arrays made from its buffers keep what they still need
            if not context.is_active():   # its client left while it was read
                return None
            try:
                reply, made = run(request, reader, writer, context, call)
                writer.flush()
            except BaseException:
                writer.free_placed()   # no reply names them
                raise
        finally:
            reader.close()
            call.bytes_out = writer.nbytes
        if reader.nbytes + writer.nbytes >= DROP_BYTES:
            self.residuals.dropper.drop((made, reader, request))
        del made, reader, request
        if not context.is_active():   # the client gave up
            self._unsent(reply, writer)
            return None
        return reply

    def _unsent(self, reply: Any, writer: FrameWriter) -> None:
        """Let go of what a reply that is not sent names: the slots its tensors were placed
        in (nobody will view them) and the residual it keeps (nobody will use it)."""
        writer.free_placed()
        if getattr(reply, "residual_id", ""):
            self.residuals.release([reply.residual_id])

    def _residual_for(self, group: Instances, request: pb.VjpRequest,
                      reader: FrameReader[Any], context: grpc.ServicerContext,
                      owner: str) -> Residual:
        name = group.primary.name
        shared: Residual | None = None   # a share held, but a graph is wanted: its inputs
        if request.residual_id:
            held = self.residuals.get(request.residual_id, owner)
            if held is not None:
                holder, residual = held
                if holder != name:
                    raise invalid(f"residual {shown(request.residual_id)} belongs to endpoint "
                                  f"{holder!r}, not {name!r}")
                kept: Residual = residual
                if not (request.keep_graph and is_share(kept)):
                    return kept
                shared = kept
        if shared is None and not request.HasField("inputs"):
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"residual {shown(request.residual_id)} is not held by this server "
                              "(released, evicted, expired, or kept by another replica); resend "
                              "the inputs to recompute", RESIDUAL_MISSING)
        self._refuse_if_draining("recomputing backward calls")
        if shared is None and request.inputs.endpoint not in ("", name):
            raise invalid(f"inputs name endpoint {shown(request.inputs.endpoint)}, "
                          f"not {name!r}")
        self.observer.recomputes.labels(name).inc()
        with group.running("forward", None if shared is None else shared.instance) as endpoint:
            inputs = (self._inputs(endpoint, request.inputs, reader) if shared is None else
                      shared.state.inputs)
            with self._turn(context):
                made = endpoint.forward(inputs, need_vjp=True)
                if made.residual is None:
                    raise invalid("no input of the re-sent call requires grad")
                made.residual.instance = endpoint.instance
                for i, level in enumerate(request.below):   # the kept Vjps it was made by
                    cotangents = codec.decode(level.cotangents, reader, endpoint.make_leaf,
                                              f"below[{i}].cotangents", statics=endpoint)
                    made = endpoint.vjp_kept(made.residual, cotangents, level.batched_cotangents)
                    assert made.residual is not None
        assert made.residual is not None
        return made.residual

    @staticmethod
    def _inputs(endpoint: Endpoint, request: pb.ForwardRequest | pb.JvpRequest,
                reader: FrameReader[Any]) -> Arguments:
        return codec.decode_arguments(request, reader, endpoint.make_leaf, statics=endpoint)

    # -- errors ------------------------------------------------------------
    @contextlib.contextmanager
    def _status(self, context: grpc.ServicerContext, method: str,
                endpoint: str = "") -> Iterator[CallRecord]:
        """Run a handler body (counted, timed and logged as one call of ``method``; the body
        adds what it learns to the record it gets), aborting the RPC with the right status
        on failure."""
        with self.observer.call(method, context.peer()) as call:
            call.endpoint = self._known(endpoint)
            self._identify(context, call)
            failure = None
            try:
                yield call
            except StatusError as err:
                failure = err
            except Exception as err:  # a bug or an unexpected input: never kill the server
                message = f"{type(err).__name__}: {err}"
                if not context.is_active():   # cancelled (idle, or by the client)
                    call.code = "CANCELLED"
                    log.info("call from %s ended before its error could be sent: %s",
                             context.peer(), message)
                    return
                log.exception("unexpected error in a call from %s", context.peer())
                if self.debug:
                    message += "\n" + traceback.format_exc()
                failure = StatusError(grpc.StatusCode.INTERNAL, message)
            if failure is not None:
                call.code = failure.code.name
                # a reason says it without the ids (secrets) its message names
                call.extra["error"] = failure.reason or clip_status(
                    failure.message.splitlines()[0], 200)
                context.abort_with_status(rich_status(failure))
