"""Shared-memory sessions on the server: creation, same-host proof, leases.

``open`` creates three regions with unguessable names: a probe holding a
random nonce and the first segment of the request and reply arenas.
``confirm`` checks the nonce the client read back, which proves it maps this
host's /dev/shm (a client in another IPC namespace or machine cannot), and
then unlinks the names: the memory lives on only while mapped, so nothing is
left in /dev/shm whichever process dies. ``grow`` adds a segment to both
arenas (doubling them, up to the per-session limit); its names are unlinked
when the client confirms it. A session not heard from within its lease is
dropped by ``sweep``.

Asked for CUDA IPC, ``open`` also makes a request and a reply pool on each
GPU the client named (by UUID) that this server sees too; ``confirm`` enables
those whose nonce the client read back through the handle.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

import grpc

from gradserve.errors import SESSION_MISSING, StatusError, invalid
from gradserve.transport import cuda_ipc, shm
from gradserve.transport.arena import ALIGN
from gradserve.v1 import gradserve_pb2 as pb


@dataclass
class _Session:
    shm: shm.ServerPeer
    names: dict[int, list[str]]      # segment -> region names not yet unlinked
    nonce: bytes
    cuda: cuda_ipc.ServerCudaPeer | None = None
    confirmed: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionManager:
    """Thread-safe registry of shared-memory sessions."""

    def __init__(self, arena_bytes: int, max_arena_bytes: int, lease: float,
                 cuda_pool_bytes: int = 256 << 20, max_cuda_pool_bytes: int = 4 << 30):
        self.arena_bytes = arena_bytes     # each arena's first segment
        # each arena, all segments together
        self.max_arena_bytes = max_arena_bytes
        self.cuda_pool_bytes = cuda_pool_bytes
        self.max_cuda_pool_bytes = max_cuda_pool_bytes
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
        nonce = secrets.token_bytes(32)
        probe = shm.new_name("probe")
        (probe_map,), _ = _create([probe], len(nonce))
        probe_map[:] = nonce
        probe_map.close()
        try:
            (request_map, reply_map), (req, rep) = _create(
                [shm.new_name("req"), shm.new_name("rep")], size)
        except StatusError:
            shm.unlink(probe)
            raise
        session = _Session(shm.ServerPeer(request_map, reply_map, size), {0: [probe, req, rep]},
                           nonce)
        reply = pb.OpenSessionResponse(probe_region=probe, request_region=req, reply_region=rep,
                                       arena_bytes=size, lease_seconds=self.lease)
        if request.cuda_devices:
            try:
                session.cuda, pools = self._cuda_pools(request)
                reply.cuda_pools.extend(pools)
            except _NoCuda as reason:
                reply.cuda_unavailable = str(reason)
        reply.session_id = sid = secrets.token_urlsafe(16)
        with self._lock:
            self._sessions[sid] = session
        return reply

    def _cuda_pools(self, request: pb.OpenSessionRequest) -> tuple[cuda_ipc.ServerCudaPeer, list]:
        size = request.cuda_pool_bytes or self.cuda_pool_bytes
        if size > self.max_cuda_pool_bytes:
            raise _NoCuda(f"CUDA IPC pools of {size} bytes asked for; this server allows at "
                          f"most {self.max_cuda_pool_bytes}")
        reason = cuda_ipc.unavailable()
        if reason:
            raise _NoCuda(f"the server cannot use CUDA IPC: {reason}")
        local = cuda_ipc.local_devices()
        shared = [(uuid, local[uuid]) for uuid in dict.fromkeys(request.cuda_devices)
                  if uuid in local]
        if not shared:
            raise _NoCuda("the server sees none of the client's GPUs (it runs on another "
                          "node, or they are hidden from it)")
        try:
            return cuda_ipc.ServerCudaPeer.create(shared, size)
        except Exception as err:   # CUDARuntimeError: out of memory, IPC not permitted
            raise _NoCuda(f"cannot make CUDA IPC pools: {err}") from None

    def grow(self, request: pb.GrowSessionRequest) -> pb.GrowSessionResponse:
        """Add a segment of at least ``min_bytes`` (doubling the arenas) within the limit."""
        session = self._get(request.session_id, confirmed=True)
        with session.lock:
            total = session.shm.size
            room = self.max_arena_bytes - total
            size = min(max(request.min_bytes, total), room)
            size = -(-size // ALIGN) * ALIGN
            if request.min_bytes == 0 or request.min_bytes > room or size > room:
                raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"cannot grow the shared-memory arenas by {request.min_bytes} "
                                  f"bytes: they hold {total} of this server's limit of "
                                  f"{self.max_arena_bytes}")
            (request_map, reply_map), names = _create(
                [shm.new_name("req"), shm.new_name("rep")], size)
            segment = session.shm.add_segment(reply_map, request_map, size, ready=False)
            session.names[segment] = names
        return pb.GrowSessionResponse(segment=segment, request_region=names[0],
                                      reply_region=names[1], segment_bytes=size)

    def confirm(self, request: pb.ConfirmSessionRequest) -> pb.ConfirmSessionResponse:
        """Unlink a mapped segment's names; for segment 0, check the nonce first."""
        if request.segment:
            session = self._get(request.session_id, confirmed=True)
            with session.lock:
                names = session.names.pop(request.segment, None)
            if names is None:
                raise invalid(f"segment {request.segment} is not awaiting confirmation")
            for name in names:
                shm.unlink(name)
            session.shm.segments[request.segment].ready = True
            return pb.ConfirmSessionResponse()
        session = self._get(request.session_id, confirmed=False)
        for name in session.names.pop(0):   # both sides have mapped them: drop the names now
            shm.unlink(name)
        if not hmac.compare_digest(session.nonce, request.nonce):
            self.close(request.session_id)
            raise invalid("the nonce does not match: client and server do not share memory")
        session.confirmed = True
        if session.cuda is None:
            return pb.ConfirmSessionResponse()
        ready = session.cuda.confirm(list(request.cuda_nonces))
        if not any(ready):
            session.cuda = None
        return pb.ConfirmSessionResponse(cuda_pools_ready=ready)

    def peers(self, state: pb.SessionState) -> list:
        """The zero-copy peers of a confirmed session (CUDA IPC first, if any, then
        shared memory); frees the reply slots the client reports."""
        session = self._get(state.id, confirmed=True)
        session.shm.free(state.freed)
        if session.cuda is None:
            return [session.shm]
        session.cuda.free(state.cuda_freed)
        return [session.cuda, session.shm]

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
        for names in session.names.values():
            for name in names:
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


class _NoCuda(Exception):
    """Why a session gets no CUDA IPC pools (told to the client, not an error)."""


def _create(names: list[str], size: int) -> tuple[list, list[str]]:
    """Create regions of ``size`` bytes under ``names``: all of them, or none."""
    maps = []
    try:
        for name in names:
            maps.append(shm.create_region(name, size))
    except OSError as err:
        for name in names[:len(maps)]:
            shm.unlink(name)
        raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"cannot create {size} bytes of shared memory: {err}") from None
    return maps, names
