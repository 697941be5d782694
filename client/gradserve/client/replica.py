"""One server a client talks to: its channel, its same-host session, its health, and the
protocol of one call to it.

A :class:`~gradserve.client.core.Client` holds one ``Replica`` per server of its
target and routes each call to one of them; everything that concerns a single
server (negotiating the transport, one-message or streamed calls, releases queued
for it, watching its ``grpc.health.v1`` status) lives here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client.calls import Call, Level, Residual
from gradserve.client.session import Session
from gradserve.client.transports import TRANSPORTS, ClientTransport
from gradserve.frameworks import Statics
from gradserve.errors import (DRAINING, LINK_BROKEN, REPLY_TOO_LARGE, DeadlineExceeded,
                              GradserveError, RemoteError, ResourceExhausted, SessionMissing,
                              StatusError, Unavailable, from_rpc_error, from_status, rpc)
from gradserve.security import identified
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire import codec
from gradserve.wire.codec import Arguments, MakeLeaf
from gradserve.wire.framing import FrameReader, FrameWriter
from gradserve.wire.memory import Data
from gradserve.wire.slots import SessionInfo

#: Seconds between attempts to open a same-host session with a server not reachable yet.
RENEGOTIATE_SECONDS = 1.0
#: Seconds after a session's link broke (its calls send bytes meanwhile) before the client
#: sets up a new session.
RELINK_SECONDS = 5.0
#: Seconds a replica that failed a call is passed over (unless it answers, or its health
#: watch says SERVING anew, first).
DOWN_SECONDS = 1.0
#: A replica's health as its client sees it: what ``grpc.health.v1`` said, or UNREACHABLE
#: (its channel or a call failed), or UNKNOWN (not heard yet, or no health service).
SERVING, NOT_SERVING, UNREACHABLE, UNKNOWN = "SERVING", "NOT_SERVING", "UNREACHABLE", "UNKNOWN"
log = logging.getLogger("gradserve.client")
T = TypeVar("T")


@dataclass(frozen=True)
class ReplicaInfo:
    """What a client sees of one replica (``Client.replicas()``)."""

    address: str
    health: str
    in_flight: int
    transport: str
    forwards: int
    vjps: int
    failures: int


@dataclass(frozen=True)
class Settings:
    """How a client talks to each of its replicas (see :class:`~gradserve.client.core.Client`)."""

    requested: str
    region_bytes: dict[str, int]
    chunk_bytes: int
    max_receive_bytes: int


class Replica:
    """One server of a client: a channel, a stub carrying the client's identity, the
    same-host session (negotiated on first use), releases queued for it, and what the
    client has learned of it (health, calls in flight, whether it takes one-message calls).
    ``watch`` starts following its health, ``close`` stops everything it started."""

    def __init__(self, address: str, channel: grpc.Channel, settings: Settings,
                 token: str | None, owns_channel: bool = True):
        self.address = address
        self.settings = settings
        self._channel = channel
        self._owns_channel = owns_channel
        self._identified = identified(channel, token)
        self.stub = pb_grpc.GradserveStub(self._identified)
        #: residual ids dropped here, sent to this server with its next call
        self.released: collections.deque[str] = collections.deque()
        #: residuals this server holds for handles still alive (released at ``close``)
        self._live: weakref.WeakSet[Residual] = weakref.WeakSet()
        self.fallback_reason = ""
        #: what the health watch last said (UNKNOWN before it did, or without one)
        self.watched = UNKNOWN
        #: what a failed call said (UNREACHABLE or NOT_SERVING), and until when it holds
        self._marked, self._marked_until = UNKNOWN, 0.0
        self.in_flight = 0
        self.forwards = self.vjps = self.failures = 0
        self._count_lock = threading.Lock()
        self._session: Session | None = None
        self._session_lock = threading.Lock()
        self._closed = False
        #: whether the server has one-message Forward/Vjp calls (older ones do not)
        self._one_message = True
        #: (call, endpoint) whose last one-message reply was large: they stream
        self._large_replies: set[tuple[str, str]] = set()
        #: when to (re)try opening a same-host session; None: settled
        self._negotiate_at: float | None = None if settings.requested == "grpc" else 0.0
        self._watcher: threading.Thread | None = None
        self._watch_call: Any = None
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------
    def negotiate(self) -> None:
        """Negotiate the same-host transport now if it is due (a forced transport that
        cannot work raises; a server not reachable yet is asked again later)."""
        with self._session_lock:
            if self._negotiate_at is not None:
                self._negotiate()

    def watch(self, on_change: Callable[["Replica"], None]) -> None:
        """Follow the server's health (``grpc.health.v1`` Watch) on a thread until ``close``;
        ``on_change(replica)`` is told when it changes."""
        if self._watcher is not None or self._closed:
            return
        self._watcher = threading.Thread(target=self._watch, args=(weakref.ref(self), on_change),
                                         name="gradserve-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop watching, release the residuals it holds for this client (best effort: no
        Vjp can use them any more), end the session, close the channel (one handed in stays
        open)."""
        if self._closed:
            return
        self._stopping.set()
        call = self._watch_call
        if call is not None:
            call.cancel()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)
        for residual in list(self._live):   # no Vjp can use them once the client is closed
            if residual.id and residual.holder is self:
                self.released.append(residual.id)
                residual.detach()
        self.flush_releases(timeout=1.0)
        self._closed = True
        with self._session_lock:
            session, self._session = self._session, None
            self._negotiate_at = None
        if session is not None:
            session.close()
        if self._owns_channel:
            self._channel.close()

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    @property
    def transport(self) -> str:
        """The transport in use: the best of the session's that works, or "grpc"."""
        session = self._session
        working = [t.name for t in session.transports if not t.broken] if session else []
        return working[-1] if working else "grpc"

    def session_info(self) -> SessionInfo | None:
        """The same-host session in use, if any."""
        session = self._session
        return session.info() if session is not None else None

    def info(self) -> ReplicaInfo:
        """A snapshot of what the client sees of this replica."""
        return ReplicaInfo(self.address, self.health, self.in_flight, self.transport,
                           self.forwards, self.vjps, self.failures)

    # -- routing state -------------------------------------------------------
    @property
    def health(self) -> str:
        """SERVING, NOT_SERVING (draining), UNREACHABLE or UNKNOWN: what a call that failed
        lately said, else what the health watch last said."""
        if time.monotonic() < self._marked_until:
            return self._marked
        return self.watched

    def usable(self) -> bool:
        """Whether new calls may go here: serving (or not known not to), not failed lately."""
        return self.health in (SERVING, UNKNOWN) and not self._closed

    @property
    def holds_residuals(self) -> bool:
        """Whether the server holds residuals for handles of this client still alive."""
        return any(r.id and r.holder is self for r in list(self._live))

    @property
    def draining(self) -> bool:
        """Whether the server said it is shutting down (it still answers held residuals)."""
        return self.health == NOT_SERVING

    def failed(self, err: RemoteError) -> None:
        """A call here was refused as unavailable: passed over for ``DOWN_SECONDS`` (as
        draining if it said so), unless it answers or its health watch says SERVING anew."""
        with self._count_lock:
            self.failures += 1
            self._marked = NOT_SERVING if err.reason == DRAINING else UNREACHABLE
            self._marked_until = time.monotonic() + DOWN_SECONDS

    @contextlib.contextmanager
    def counted(self, kind: str) -> Iterator[None]:
        """Count one call of ``kind`` ("forward", "vjp", other) in flight here while it runs."""
        with self._count_lock:
            self.in_flight += 1
            if kind == "forward":
                self.forwards += 1
            elif kind == "vjp":
                self.vjps += 1
        try:
            yield
        finally:
            with self._count_lock:
                self.in_flight -= 1
        if kind == "forward" or self._marked == UNREACHABLE:   # it answered: usable again
            self._marked_until = 0.0

    # -- calls -------------------------------------------------------------
    def forward(self, call: Call, make_leaf: MakeLeaf, need_vjp: bool,
                timeout: float | None, statics: Statics | None = None
                ) -> tuple[Any, Residual | None]:
        """One Forward here: its decoded outputs and, with ``need_vjp``, the residual."""
        return self.in_session(lambda session: self._forward_once(
            session, call, make_leaf, need_vjp, timeout, statics))

    def jvp(self, call: Call, tangents: Arguments, make_leaf: MakeLeaf, batched: bool,
            timeout: float | None, statics: Statics | None = None) -> tuple[Any, Any]:
        """One Jvp here: the decoded outputs and their tangents."""
        found: tuple[Any, Any] = self.in_session(lambda session: self._jvp_once(
            session, call, tangents, make_leaf, batched, timeout, statics))
        return found

    def vjp(self, residual: Residual, level: Level, make_leaf: MakeLeaf, resend: bool,
            keep: bool, timeout: float | None, statics: Statics | None = None
            ) -> tuple[Arguments, Residual | None]:
        """One Vjp here of ``level``'s cotangents, re-sending the call's inputs (and the
        levels below) with ``resend``; with ``keep``, the residual of its gradients too."""
        found: tuple[Arguments, Residual | None] = self.in_session(
            lambda session: self._vjp_once(session, residual, level, make_leaf, resend, keep,
                                           timeout, statics))
        return found

    def release(self, ids: list[str], timeout: float | None) -> int:
        """Free residuals this server holds; how many it still held."""
        released: int = self.unary(self.stub.Release, pb.ReleaseRequest(residual_ids=ids),
                                   timeout, flush=False).released
        return released

    def allocate(self, nbytes: int, gpu: int | None) -> Data | None:
        """Bytes in a request slot of this replica's session on ``gpu``, or None."""
        session = self.session_now()
        return session.allocate(nbytes, gpu) if session is not None else None

    def _forward_once(self, session: Session | None, call: Call, make_leaf: MakeLeaf,
                      need_vjp: bool, timeout: float | None,
                      statics: Statics | None) -> tuple[Any, Residual | None]:
        writer = FrameWriter(self.settings.chunk_bytes, slots=session)
        request = pb.ForwardRequest(endpoint=call.endpoint, need_vjp=need_vjp)
        try:
            codec.encode_arguments(call.inputs, writer, request, call.requires_grad)
            request.release.extend(self._take_releases())
            header, outputs = self._exchange(
                "Forward", request, writer, session, timeout,
                lambda header, reader: codec.decode(header.outputs, reader, make_leaf, "outputs",
                                                    statics=statics))
            residual = (Residual(call, header.residual_id, self.released, self)
                        if need_vjp else None)
            if residual is not None:
                self._hold(residual, writer, session)
            return outputs, residual
        except BaseException:
            self.released.extend(request.release)  # releasing twice is harmless
            raise
        finally:
            writer.free_placed()

    def _hold(self, residual: Residual, writer: FrameWriter, session: Session | None) -> None:
        """Track a residual the server kept, with the request slots it views: they stay
        allocated while the residual lives (``writer`` then frees none of them)."""
        if not residual.id:
            return
        self._live.add(residual)
        viewed = [ref for ref in writer.placed if isinstance(ref, pb.SlotRef)]
        if viewed and session is not None:   # transfers went: the writer lets go of them
            weakref.finalize(residual, session.free, viewed)
            writer.placed = [ref for ref in writer.placed if not isinstance(ref, pb.SlotRef)]

    def _jvp_once(self, session: Session | None, call: Call, tangents: Arguments,
                  make_leaf: MakeLeaf, batched: bool, timeout: float | None,
                  statics: Statics | None) -> tuple[Any, Any]:
        writer = FrameWriter(self.settings.chunk_bytes, slots=session)
        try:
            request = pb.JvpRequest(endpoint=call.endpoint, batched_tangents=batched)
            codec.encode_arguments(call.inputs, writer, request)
            codec.encode_arguments(tangents, writer, request.tangents)
            _, found = self._exchange(
                "Jvp", request, writer, session, timeout,
                lambda header, reader: (
                    codec.decode(header.outputs, reader, make_leaf, "outputs", statics=statics),
                    codec.decode(header.tangents, reader, make_leaf, "tangents",
                                 statics=statics)))
            return found
        finally:
            writer.free_placed()

    def _vjp_once(self, session: Session | None, residual: Residual, level: Level,
                  make_leaf: MakeLeaf, resend: bool, keep: bool,
                  timeout: float | None, statics: Statics | None
                  ) -> tuple[Arguments, Residual | None]:
        writer = FrameWriter(self.settings.chunk_bytes, slots=session)
        kept = None
        try:
            request = pb.VjpRequest(endpoint=residual.call.endpoint, residual_id=residual.id,
                                    batched_cotangents=level.batched, keep_graph=keep)
            codec.encode_into(request.cotangents, level.cotangents, writer,
                              level.requires_grad if keep else None, "cotangents")
            if resend:
                request.inputs.endpoint = residual.call.endpoint
                request.inputs.need_vjp = True
                codec.encode_arguments(residual.call.inputs, writer, request.inputs,
                                       residual.call.requires_grad)
                for i, below in enumerate(residual.levels):
                    msg = request.below.add(batched_cotangents=below.batched)
                    codec.encode_into(msg.cotangents, below.cotangents, writer,
                                      below.requires_grad, f"below[{i}].cotangents")
            header, grads = self._exchange(
                "Vjp", request, writer, session, timeout,
                lambda header, reader: codec.decode_arguments(header, reader, make_leaf,
                                                              statics=statics))
            if keep:
                kept = Residual(residual.call, header.residual_id, self.released, self,
                                (*residual.levels, level), residual)
                self._hold(kept, writer, session)
            return grads, kept
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
        reader: FrameReader[Session] = FrameReader(self.settings.max_receive_bytes,
                                                   slots_for=lambda header: session)
        key = (call, request.endpoint)
        try:
            writer.flush()
            header = None
            if writer.one_message and self._one_message and key not in self._large_replies:
                try:
                    header = reader.read_header(
                        self.invoke(getattr(self.stub, call + "Unary"), request, timeout))
                except RemoteError as err:
                    if err.reason == REPLY_TOO_LARGE:   # this endpoint's replies are large
                        self._large_replies.add(key)
                    elif err.code == grpc.StatusCode.UNIMPLEMENTED and not err.reason:
                        self._one_message = False   # a server from before one-message calls
                    else:
                        raise
                else:
                    if header.ByteSize() > self.settings.chunk_bytes:
                        self._large_replies.add(key)
            if header is None:
                frame_type = getattr(pb, call + "Frame")
                frames = self.invoke(getattr(self.stub, call),
                                     writer.frames(frame_type, request), timeout)
                header = self._read(reader, frames)
                if not reader.chunked:
                    self._large_replies.discard(key)
            decoded = decode(header, reader)
        except BaseException as err:
            if session is not None and state is not None:
                session.put_back([*state.freed_slots, *reader.unviewed()])
            if isinstance(err, RemoteError) and err.reason == LINK_BROKEN and session:
                session.link_broke(err.message)   # the server found it (this side marks its own)
            if isinstance(err, StatusError) and err.code in (grpc.StatusCode.UNAVAILABLE,
                                                             grpc.StatusCode.CANCELLED):
                raise from_status(err) from None   # a transfer of this side's failed
            raise
        finally:
            reader.close()
        if reader.spilled and session is not None:   # the reply regions were full: grow them
            session.spilled(reader.spilled)
        return header, decoded

    def in_session(self, attempt: Callable[[Session | None], T]) -> T:
        """Run a call in the current session; if the server lost it (a restart), reopen once."""
        session = self.session_now()
        try:
            return attempt(session)
        except SessionMissing:
            if session is None:
                raise
            self._reopen(session)
            return attempt(self.session_now())

    def session_now(self) -> Session | None:
        """The session calls go through, negotiating it first where that is due."""
        self._check_open()
        due = self._negotiate_at
        requested = self.settings.requested
        forced = requested not in ("auto", "grpc")
        lost = self._session
        if (lost is not None and lost.broken_at is not None
                and time.monotonic() - lost.broken_at > RELINK_SECONDS):
            self._relink(lost)
        if due is not None and time.monotonic() >= due:
            if self._session_lock.acquire(blocking=forced):
                try:
                    if self._negotiate_at is not None:
                        self._negotiate()
                finally:
                    self._session_lock.release()
        session = self._session
        if session is None and forced:
            reason = f"the {requested} transport is not set up: {self.fallback_reason}"
            if self._negotiate_at is not None:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, reason)
            raise GradserveError(reason)
        return session

    def _relink(self, lost: Session) -> None:
        """Replace a session whose link broke ``RELINK_SECONDS`` ago: one thread does, the
        others go on sending bytes meanwhile. Where no new session comes up, it is asked for
        again ``RELINK_SECONDS`` later (a forced transport's calls fail UNAVAILABLE until)."""
        if not self._session_lock.acquire(blocking=False):
            return
        try:
            if self._session is not lost:
                return
            log.info("gradserve: the session with %s has a broken link; setting up another",
                     self.address)
            lost.close()
            self._session = None
            try:
                self._negotiate()
            except GradserveError:
                pass   # said by the calls: the forced transport is not set up
            if self._session is None:
                self._negotiate_at = time.monotonic() + RELINK_SECONDS
        finally:
            self._session_lock.release()

    def _reopen(self, lost: Session) -> None:
        """Replace a session the server no longer holds (once, whichever thread asks)."""
        with self._session_lock:
            if self._session is lost:
                log.info("gradserve: same-host session with %s lost (server restarted?); "
                         "reopening", self.address)
                lost.close(tell_server=False)
                self._session = None
                self._negotiate()

    def _negotiate(self) -> None:
        """Open a session for the requested transport (holding the session lock): the
        same-host ones first, then, under ``auto`` where none is available here or the
        server's regions were out of reach (another host), UCX."""
        requested = self.settings.requested
        same_host = [n for n, kind in TRANSPORTS.items() if kind.same_host]
        if requested == "auto":
            rounds = [same_host, [n for n in TRANSPORTS if n not in same_host]]
        elif requested in same_host:
            rounds = [same_host[:same_host.index(requested) + 1]]
        else:
            rounds = [[requested]]
        session, reasons = None, dict[str, str]()
        tried: list[str] = []   # names asked of the server (available here)
        asked: list[ClientTransport] = []
        for names in rounds:
            if asked and not any(t.unreachable for t in asked):
                break   # the same-host ones were refused, not out of reach: no other host
            transports = [TRANSPORTS[n](self.settings.region_bytes.get(n, 0)) for n in names]
            local = {t.name: t.unavailable() for t in transports}
            if requested != "auto" and local[requested]:
                self._settle_failure(local[requested])
            usable: list[ClientTransport] = [t for t in transports if not local[t.name]]
            reasons.update({n: why for n, why in local.items() if why})
            if not usable:
                continue
            tried.extend(t.name for t in usable)
            asked.extend(usable)
            try:
                session, found = Session.open(self.stub, usable)
                reasons.update(found)
            except (Unavailable, DeadlineExceeded) as err:   # no server there yet: ask later
                self._negotiate_at = time.monotonic() + RENEGOTIATE_SECONDS
                self.fallback_reason = f"the server is not reachable yet ({err.message})"
                return
            except ResourceExhausted as err:   # its sessions are all taken: ask later
                self._negotiate_at = time.monotonic() + 10 * RENEGOTIATE_SECONDS
                self.fallback_reason = f"the server has no room for a session now ({err.message})"
                return
            except RemoteError as err:
                reasons.update({t.name: str(err) for t in usable})
            if session is not None:
                break
        self._negotiate_at = None
        in_use = [t.name for t in session.transports] if session is not None else []
        if requested not in ("auto", *in_use):
            if session is not None:
                session.close()
            self._settle_failure(reasons.get(requested, "the server refused it"))
        if session is not None:
            session.start()
        self._session = session
        rank = ["grpc", *TRANSPORTS]
        candidates = tried or [n for names in rounds for n in names]
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
        raise GradserveError(f"the {self.settings.requested} transport cannot work here: "
                             f"{reason}")

    def _check_open(self) -> None:
        if self._closed:
            raise GradserveError(f"this client of {self.address} is closed")

    def invoke(self, method: Any, request: Any, timeout: float | None) -> Any:
        """Call an RPC of this replica's (its reply, or a stream's iterator)."""
        self._check_open()
        return rpc(method, request, timeout)

    def unary(self, method: Any, request: Any, timeout: float | None,
              flush: bool = True) -> Any:
        """A unary RPC, after sending queued releases (``flush``)."""
        if flush:
            self.flush_releases(timeout)
        return self.invoke(method, request, timeout)

    @staticmethod
    def _read(reader: FrameReader[Any], frames: Iterator[Any]) -> Any:
        try:
            return reader.read(frames)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _take_releases(self) -> list[str]:
        ids = []
        while self.released:
            ids.append(self.released.popleft())
        return ids

    def flush_releases(self, timeout: float | None = None) -> None:
        """Send queued releases and freed reply slots; on failure keep both queued."""
        session = self._session
        if not self.released and not (session is not None and session.has_freed()):
            return
        ids = self._take_releases()
        request = pb.ReleaseRequest(residual_ids=ids)
        state = session.state() if session is not None else None
        if state is not None:
            request.session.CopyFrom(state)
        try:
            self.unary(self.stub.Release, request, timeout, flush=False)
        except RemoteError:
            self.released.extend(ids)
            if session is not None and state is not None:
                session.put_back(state.freed_slots)

    # -- health ------------------------------------------------------------
    def _heard(self, health: str, on_change: Callable[["Replica"], None]) -> None:
        """The health watch learned ``health``: record it, and say so if it changed."""
        if self.watched == health:
            return
        self.watched = health
        if health == SERVING:   # news newer than any failed call's
            self._marked_until = 0.0
        log.info("gradserve: replica %s is %s", self.address, health)
        on_change(self)

    @staticmethod
    def _watch(ref: "weakref.ref[Replica]", on_change: Callable[["Replica"], None]) -> None:
        """Follow the server's overall health until the replica closes (or is dropped)."""
        pause = 0.1
        while True:
            replica = ref()
            if replica is None or replica._stopping.is_set():
                return
            stub: Any = health_pb2_grpc.HealthStub(replica._identified)   # stubs lack its methods
            stream = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            replica._watch_call = stream
            stopping = replica._stopping
            if stopping.is_set():   # close() came between the check above and now
                stream.cancel()
                return
            # a replica dropped without close() ends its watch: the stream holds only the channel
            ended = weakref.finalize(replica, stream.cancel)
            del replica
            try:
                for reply in stream:
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    _tell(ref, status if status in (SERVING, NOT_SERVING) else UNKNOWN,
                          on_change)
                    pause = 0.1
                code = None
            except grpc.RpcError as err:
                code = err.code()
            ended.detach()
            if stopping.is_set() or ref() is None:
                return
            if code == grpc.StatusCode.UNIMPLEMENTED:   # no health service: calls tell
                _tell(ref, UNKNOWN, on_change)
                return
            _tell(ref, UNREACHABLE, on_change)
            if stopping.wait(pause):
                return
            pause = min(pause * 2, 2.0)


def _tell(ref: "weakref.ref[Replica]", health: str,
          on_change: Callable[[Replica], None]) -> None:
    replica = ref()
    if replica is not None:
        replica._heard(health, on_change)
