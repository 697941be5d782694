"""Same-host sessions on the server: the region table, proof of attachment, growth, leases.

``open`` asks each transport module the client named for its probe regions
(``gradserve.server.transports``) and numbers them in one table per session.
Every region starts with a random nonce; ``confirm`` compares what the client
read through its own mapping. A probe whose nonce came back proves the client
shares that memory: only then are the session's real regions made (sent back
for the client to attach to and prove in turn). A region whose nonce came back
is used, one the client could not attach to is dropped, and a wrong nonce ends
the session. ``grow`` adds regions to a transport. A session not confirmed
within seconds, or not heard from within its lease, is dropped by ``sweep``;
sessions are bounded per connection and per server, and their memory by the
server's :class:`~gradserve.server.transports.base.Budget`. Nothing here
knows one transport from another.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
import threading
import time
from typing import Any, Callable, Iterable

import grpc

from gradserve.errors import SESSION_MISSING, StatusError, invalid, shown
from gradserve.server.transports import TRANSPORTS, Refusal, ServerTransport, SessionSettings
from gradserve.server.transports.base import Budget, NewRegion
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.slots import KIND_NAMES, Region, SessionInfo, Slots


class ServerSession(Slots[ServerTransport]):
    """One client's session: its transports as one store of slots, and the regions
    awaiting proof."""

    def __init__(self, session_id: str, peer: str = "", owner: str = ""):
        super().__init__([])
        self.id = session_id
        self.peer = peer
        self.owner = owner   # only calls of this principal may use the session
        self.confirmed = False
        self.closed = False
        self.opened = self.last_seen = time.monotonic()
        self.lock = threading.Lock()
        #: held while regions are made for this session (one growth at a time); not
        #: ``lock``, which closing and the sweeper take
        self.making = threading.Lock()
        self._indices = itertools.count()
        self._pending: dict[int, tuple[ServerTransport, NewRegion]] = {}

    def next_index(self) -> int:
        """The next free index of the region table."""
        return next(self._indices)

    def expect(self, transport: ServerTransport, made: list[NewRegion]) -> list[pb.Region]:
        """Regions sent to the client, used once their nonce comes back (``transport`` joins
        the session if it is new). If the session ended while they were made, the transport
        lets go of them and SESSION_MISSING is raised."""
        with self.lock:
            if not self.closed:
                if transport not in self.transports:
                    self.transports.append(transport)
                for new in made:
                    self._pending[new.region.index] = (transport, new)
                return [new.to_pb() for new in made]
        transport.close()   # what closing the session did not see
        raise self._ended()

    def prove(self, proofs: Iterable[pb.RegionProof]) -> tuple[int | None, list[tuple[
            ServerTransport, Region]]]:
        """Use the regions whose nonce came back and drop those the client could not
        attach to. Returns the first region whose nonce is wrong (if any) and the probes
        proved (INVALID_ARGUMENT for a region not awaiting proof)."""
        probes: list[tuple[ServerTransport, Region]] = []
        with self.lock:
            self._check_open()
            for proof in proofs:
                pending = self._pending.pop(proof.region, None)
                if pending is None:
                    raise invalid(f"region {proof.region} is not awaiting confirmation")
                transport, new = pending
                region = new.region
                if not (proof.nonce and hmac.compare_digest(proof.nonce, new.nonce)):
                    transport.discard(region)
                    if proof.nonce:
                        return proof.region, probes
                elif region.direction == pb.PROBE:
                    transport.discard(region)       # it did its job
                    probes.append((transport, region))
                    self.confirmed = True
                elif transport.confirm(region):
                    self.confirmed = True           # a link needs no probe
                else:
                    transport.discard(region)
        return None, probes

    def ready(self) -> list[int]:
        """Indices of the regions in use."""
        return [r.index for t in self.transports for r in t.regions if r.ready]

    def close(self) -> None:
        """Let go of every region (views in use keep their memory until they go); regions
        being made for the session are refused from now on."""
        with self.lock:
            self.closed = True
            self._pending.clear()
            for transport in self.transports:
                transport.close()

    def _check_open(self) -> None:
        if self.closed:
            raise self._ended()

    def _ended(self) -> StatusError:
        return StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"same-host session {shown(self.id)} ended", SESSION_MISSING)

    def info(self) -> SessionInfo:
        """A snapshot for introspection."""
        return SessionInfo(self.id, tuple(t.name for t in self.transports),
                           tuple(r.info() for t in self.transports for r in t.regions),
                           copied=sum(t.copied for t in self.transports),
                           in_place=sum(t.in_place for t in self.transports),
                           transfers=sum(t.in_flight() for t in self.transports))


class SessionManager:
    """Thread-safe registry of same-host sessions."""

    def __init__(self, settings: SessionSettings = SessionSettings(),
                 on_close: Callable[[str], Any] | None = None):
        self.settings = settings
        #: the bytes all sessions together may hold, per kind (and GPU)
        self.budget = Budget(settings)
        #: called with the id of every session that ends
        self.on_close = on_close
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Before the first session: each transport kind claims (or cleans up) what it needs."""
        for kind in TRANSPORTS.values():
            kind.server_starting(self.settings)

    def stop(self) -> None:
        """End every session and let each transport kind go of what ``start`` took."""
        self.close_all()
        for kind in TRANSPORTS.values():
            kind.server_stopping(self.settings)

    def open(self, request: pb.OpenSessionRequest, peer: str = "",
             owner: str = "") -> pb.OpenSessionResponse:
        """Make the probe regions of every transport asked for (or say why not), for a
        session of ``owner`` (counted against ``peer``'s limit)."""
        kinds = [t.kind for t in request.transports]
        if not kinds:
            raise invalid("OpenSession asks for no transport; this server offers "
                          + ", ".join(KIND_NAMES[k] for k in TRANSPORTS))
        if len(set(kinds)) != len(kinds):
            raise invalid(f"OpenSession asks for a region kind twice ({kinds})")
        self.sweep()
        session = self._admit(peer, owner)
        reply = pb.OpenSessionResponse(lease_seconds=self.settings.session_lease)
        try:
            for asked in request.transports:
                kind = TRANSPORTS.get(asked.kind)
                if kind is None:
                    reply.refused.add(kind=asked.kind,
                                      reason=f"this server offers no region kind {asked.kind}")
                    continue
                try:
                    transport, made = kind.create(asked, self.settings, self.budget,
                                                  session.next_index)
                except Refusal as why:
                    reply.refused.add(kind=asked.kind, reason=str(why))
                    continue
                reply.regions.extend(session.expect(transport, made))
        except BaseException:
            self.close(session.id)
            raise
        if reply.regions:
            reply.session_id = session.id
            session.opened = time.monotonic()   # the proof window starts when the probes exist
        else:
            self.close(session.id)
        return reply

    def _admit(self, peer: str, owner: str) -> ServerSession:
        """A new, unconfirmed session, counted at once against the limits (RESOURCE_EXHAUSTED
        past them). Unconfirmed sessions may take a quarter of the table: past that the
        oldest one gives way, so clients that never prove anything cannot lock others out."""
        settings = self.settings
        evicted = None
        with self._lock:
            sessions = list(self._sessions.values())
            mine = sum(1 for s in sessions if s.peer == peer)
            if peer and mine >= settings.max_sessions_per_peer:
                raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"this connection (or token) holds {mine} same-host sessions, "
                                  "its limit")
            waiting = sorted((s for s in sessions if not s.confirmed), key=lambda s: s.opened)
            if waiting and len(waiting) >= max(1, settings.max_sessions // 4):
                evicted = waiting[0]
                del self._sessions[evicted.id]
            elif len(sessions) >= settings.max_sessions:
                raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"this server holds {len(sessions)} same-host sessions, its "
                                  "limit")
            session = ServerSession(secrets.token_urlsafe(16), peer, owner)
            self._sessions[session.id] = session
        if evicted is not None:
            evicted.close()
            if self.on_close is not None:
                self.on_close(evicted.id)
        return session

    def confirm(self, request: pb.ConfirmSessionRequest,
                owner: str | None = None) -> pb.ConfirmSessionResponse:
        """Check the nonces the client read back; make the regions the proved probes stand
        for; the regions in use after it."""
        session = self._get(request.session_id, confirmed=None, owner=owner)
        wrong, probes = session.prove(request.proofs)
        if wrong is not None:
            self.close(session.id)
            raise invalid(f"the nonce of region {wrong} does not match: client and server do "
                          "not share that memory")
        reply = pb.ConfirmSessionResponse()
        for transport, probe in probes:
            try:
                made = transport.regions_for(probe, session.next_index)
            except Refusal as why:
                reply.refused.add(kind=transport.kind, reason=str(why))
                continue
            reply.regions.extend(session.expect(transport, made))
        reply.ready.extend(session.ready())
        return reply

    def grow(self, request: pb.GrowSessionRequest,
             owner: str | None = None) -> pb.GrowSessionResponse:
        """Add regions of one kind to a confirmed session, within the server's limits."""
        session = self._get(request.session_id, confirmed=True, owner=owner)
        transport = next((t for t in session.transports if t.kind == request.kind), None)
        if transport is None:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"session has no {KIND_NAMES.get(request.kind, request.kind)} "
                              "regions to grow")
        with session.making:
            session._check_open()
            made = transport.grow(request, session.next_index)
        return pb.GrowSessionResponse(regions=session.expect(transport, made))

    def slots(self, state: pb.SessionState, owner: str | None = None) -> ServerSession:
        """The confirmed session a request names, after freeing the reply slots it reports."""
        session = self._get(state.id, confirmed=True, owner=owner)
        session.free(state.freed_slots)
        return session

    def free(self, state: pb.SessionState, owner: str | None = None) -> None:
        """Free the reply slots ``state`` reports, if its session is still held (and
        ``owner``'s)."""
        with self._lock:
            session = self._sessions.get(state.id)
        if session is not None and session.confirmed and owner in (None, session.owner):
            session.free(state.freed_slots)

    def keep_alive(self, sid: str, owner: str | None = None) -> bool:
        """Extend a confirmed session's lease; False if the server does not hold one of
        ``owner``'s (an unconfirmed session lives only ``session_proof_seconds``)."""
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or not session.confirmed or owner not in (None, session.owner):
                return False
            session.last_seen = time.monotonic()
            return True

    def close(self, sid: str, owner: str | None = None) -> bool:
        """End a session (only if it is ``owner``'s, where one is named); False if the
        server did not hold it."""
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or (owner is not None and session.owner != owner):
                return False
            del self._sessions[sid]
        session.close()
        if self.on_close is not None:
            self.on_close(sid)
        return True

    def sweep(self) -> None:
        """Drop sessions not confirmed in time, or not heard from within their lease (their
        memory goes with the last view)."""
        now = time.monotonic()
        settings = self.settings
        with self._lock:
            expired = [sid for sid, s in self._sessions.items()
                       if now - s.last_seen > settings.session_lease
                       or (not s.confirmed and now - s.opened > settings.session_proof_seconds)]
        for sid in expired:
            self.close(sid)

    def count(self) -> int:
        """Sessions held now."""
        with self._lock:
            return len(self._sessions)

    def info(self, sid: str) -> SessionInfo:
        """A snapshot of one session (FAILED_PRECONDITION if it is not held)."""
        return self._get(sid, confirmed=None, touch=False).info()

    def close_all(self) -> None:
        """End every session."""
        with self._lock:
            sids = list(self._sessions)
        for sid in sids:
            self.close(sid)

    def _get(self, sid: str, confirmed: bool | None, touch: bool = True,
             owner: str | None = None) -> ServerSession:
        """The session ``sid`` (of ``owner``, where one is named: another's looks exactly
        like an unknown one); FAILED_PRECONDITION with reason ``session-missing`` if not."""
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None and owner is not None and session.owner != owner:
                session = None
            if session is not None and touch and session.confirmed:
                session.last_seen = time.monotonic()
        if session is None or (confirmed and not session.confirmed):
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"no {'confirmed ' if confirmed else ''}same-host session {shown(sid)} "
                              "(expired, closed, or the server restarted)", SESSION_MISSING)
        return session
