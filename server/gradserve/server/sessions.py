"""Shared-memory sessions on the server: creation, same-host proof, leases.

``open`` creates three regions with unguessable names: a probe holding a
random nonce, the request arena and the reply arena. ``confirm`` checks the
nonce the client read back, which proves it maps this host's /dev/shm (a
client in another IPC namespace or machine cannot), and then unlinks all three
names: the memory lives on only while mapped, so nothing is left in /dev/shm
whichever process dies. A session not heard from within its lease is dropped
by ``sweep``.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

import grpc

from gradserve.errors import SESSION_MISSING, StatusError, invalid
from gradserve.transport import shm
from gradserve.v1 import gradserve_pb2 as pb


@dataclass
class _Session:
    peer: shm.ServerPeer
    names: list[str]
    nonce: bytes
    confirmed: bool = False
    last_seen: float = field(default_factory=time.monotonic)


class SessionManager:
    """Thread-safe registry of shared-memory sessions."""

    def __init__(self, arena_bytes: int, max_arena_bytes: int, lease: float):
        self.arena_bytes = arena_bytes
        self.max_arena_bytes = max_arena_bytes
        self.lease = lease
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def open(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        if not shm.available():
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "this server has no /dev/shm")
        size = request.arena_bytes or self.arena_bytes
        if size > self.max_arena_bytes:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"arena of {size} bytes asked for; this server allows at most "
                              f"{self.max_arena_bytes}")
        probe, req, rep = (shm.new_name(kind) for kind in ("probe", "req", "rep"))
        nonce = secrets.token_bytes(32)
        created: list[str] = []
        try:
            probe_map = shm.create_region(probe, len(nonce))
            created.append(probe)
            probe_map[:] = nonce
            probe_map.close()
            request_map = shm.create_region(req, size)
            created.append(req)
            reply_map = shm.create_region(rep, size)
            created.append(rep)
        except OSError as err:
            for name in created:
                shm.unlink(name)
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"cannot create shared memory: {err}") from None
        sid = secrets.token_urlsafe(16)
        with self._lock:
            self._sessions[sid] = _Session(shm.ServerPeer(request_map, reply_map, size),
                                           created, nonce)
        return pb.OpenSessionResponse(session_id=sid, probe_region=probe, request_region=req,
                                      reply_region=rep, arena_bytes=size,
                                      lease_seconds=self.lease)

    def confirm(self, request: pb.ConfirmSessionRequest) -> None:
        session = self._get(request.session_id, confirmed=False)
        for name in session.names:   # both sides have mapped them: drop the names now
            shm.unlink(name)
        if not hmac.compare_digest(session.nonce, request.nonce):
            self.close(request.session_id)
            raise invalid("the nonce does not match: client and server do not share memory")
        session.confirmed = True

    def peer(self, state: pb.SessionState) -> shm.ServerPeer:
        """The arenas of a confirmed session; frees the reply slots the client reports."""
        session = self._get(state.id, confirmed=True)
        session.peer.free(list(state.freed))
        return session.peer

    def keep_alive(self, sid: str) -> bool:
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                session.last_seen = time.monotonic()
            return session is not None

    def close(self, sid: str) -> bool:
        with self._lock:
            session = self._sessions.pop(sid, None)
        if session is None:
            return False
        for name in session.names:
            shm.unlink(name)
        return True

    def sweep(self) -> None:
        """Drop sessions whose lease ran out (their memory goes with the last view)."""
        now = time.monotonic()
        with self._lock:
            expired = [sid for sid, s in self._sessions.items() if now - s.last_seen > self.lease]
        for sid in expired:
            self.close(sid)

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close_all(self) -> None:
        with self._lock:
            sids = list(self._sessions)
        for sid in sids:
            self.close(sid)

    def _get(self, sid: str, confirmed: bool) -> _Session:
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                session.last_seen = time.monotonic()
        if session is None or session.confirmed != confirmed:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"no {'open' if confirmed else 'unconfirmed'} shared-memory session "
                              f"{sid!r} (expired, closed, or the server restarted)",
                              SESSION_MISSING)
        return session
