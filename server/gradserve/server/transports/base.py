"""What every server-side transport module implements: :class:`ServerTransport`.

A transport module (``shm``, ``cuda_ipc``) owns the server's side of one kind
of region from start to end: the small probe regions ``OpenSession`` makes
(``create``), the real regions it makes once a probe was proved
(``regions_for``), growing them (``grow``), using a region once its nonce came
back (``confirm``), and letting go of everything when the session ends
(``close``). Every region starts with a random nonce the client must read back
through its own mapping. Every byte a transport holds is taken from the
server-wide :class:`Budget` first, and given back when the region goes. The
data path (place, check, view, free) is the shared
:class:`~gradserve.wire.slots.RegionTransport`; the generic
:class:`~gradserve.server.sessions.SessionManager` runs the RPCs.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc

from gradserve.errors import BUDGET_SPENT, REGIONS_AT_LIMIT, StatusError
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.slots import ALIGN, KIND_NAMES, NONCE_BYTES, Arena, Region, RegionTransport

#: Size of a probe region: room for the nonce, rounded to a page.
PROBE_BYTES = 4096


class Refusal(Exception):
    """Why a session gets no regions of a transport (told to the client, not an error)."""


@dataclass(frozen=True)
class SessionSettings:
    """The server's bounds on same-host sessions: ``Server``'s keywords of the same names
    (and its defaults)."""

    shm_arena_bytes: int = 16 << 20        # each shared-memory region of a new session
    max_shm_arena_bytes: int = 2 << 30     # all of a session's request (or reply) regions
    cuda_pool_bytes: int = 256 << 20       # each CUDA IPC pool, unless the client asks
    max_cuda_pool_bytes: int = 4 << 30     # the most a client may ask for
    session_lease: float = 30.0            # seconds a confirmed session lives unheard of
    max_shm_total_bytes: int = 8 << 30     # shared memory of all sessions together
    max_cuda_total_bytes: int = 8 << 30    # CUDA IPC pools of all sessions, per GPU
    max_sessions: int = 256                # sessions held at once
    max_sessions_per_peer: int = 16        # sessions one connection may hold
    session_proof_seconds: float = 10.0    # how long a session may wait for its proof
    transfer_timeout: float = 30.0         # how long a UCX transfer of a call may take
    owner: str = ""                        # this server's token in region names (shm)


class Budget:
    """Bytes of same-host memory all sessions together may hold, per kind and device."""

    def __init__(self, settings: SessionSettings):
        self._limits: dict[int, int] = {pb.SHARED_MEMORY: settings.max_shm_total_bytes,
                        pb.CUDA_IPC: settings.max_cuda_total_bytes}
        self._used: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def take(self, kind: int, device: str, nbytes: int) -> None:
        """Reserve ``nbytes``; RESOURCE_EXHAUSTED (at-limit) when they are not there."""
        limit = self._limits.get(kind, 0)
        with self._lock:
            used = self._used.get((kind, device), 0)
            if used + nbytes > limit:
                where = f" on GPU {device}" if device else ""
                raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"this server's {KIND_NAMES.get(kind, kind)} budget{where} is "
                                  f"spent: {used} of {limit} bytes held, {nbytes} more asked for",
                                  BUDGET_SPENT)
            self._used[(kind, device)] = used + nbytes

    def give(self, kind: int, device: str, nbytes: int) -> None:
        """Return bytes ``take`` reserved."""
        with self._lock:
            self._used[(kind, device)] = self._used.get((kind, device), 0) - nbytes

    def used(self, kind: int, device: str = "") -> int:
        """Bytes held now."""
        with self._lock:
            return self._used.get((kind, device), 0)


@dataclass(frozen=True)
class NewRegion:
    """A region just created, with what the client needs to attach and prove it."""

    region: Region
    handle: bytes
    nonce: bytes
    link: int = 0

    def to_pb(self) -> pb.Region:
        """The table entry sent to the client."""
        r = self.region
        return pb.Region(index=r.index, kind=r.kind, direction=r.direction, nbytes=r.size,
                         device=r.device, handle=self.handle, link=self.link)


#: Gives the next free index of the session's region table.
NextIndex = Callable[[], int]


class ServerTransport(RegionTransport):
    """The server's side of one same-host transport in a session."""

    def __init__(self, region_bytes: int, settings: SessionSettings, budget: Budget):
        super().__init__(pb.REPLY)
        #: size of each region the session's first regions get (as asked, or the default)
        self.region_bytes = region_bytes
        self.settings = settings
        self.budget = budget

    @classmethod
    def server_starting(cls, settings: SessionSettings) -> None:
        """The server starts (before any session): claim or clean up what the kind needs."""

    @classmethod
    def server_stopping(cls, settings: SessionSettings) -> None:
        """The server stopped (every session ended): let go of what ``server_starting`` took."""

    @classmethod
    def create(cls, request: pb.TransportRequest, settings: SessionSettings, budget: Budget,
               next_index: NextIndex) -> tuple["ServerTransport", list[NewRegion]]:
        """The transport and its probe regions, as ``request`` asks; ``Refusal`` says why not."""
        raise NotImplementedError

    def regions_for(self, probe: Region, next_index: NextIndex) -> list[NewRegion]:
        """The first real regions, made once ``probe`` was proved; ``Refusal`` says why not."""
        raise NotImplementedError

    def grow(self, request: pb.GrowSessionRequest, next_index: NextIndex) -> list[NewRegion]:
        """More regions that can hold ``request.min_bytes``; RESOURCE_EXHAUSTED where not."""
        raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.label} regions do not grow; their size is fixed per session",
                          REGIONS_AT_LIMIT)

    def new_region(self, next_index: NextIndex, direction: pb.Direction, size: int,
                   make: Callable[[], tuple[Any, bytes]], *, device: str = "",
                   gpu: int | None = None, align: int = ALIGN) -> NewRegion:
        """The session's next region, of ``size`` bytes: taken from the server's budget first (RESOURCE_EXHAUSTED
        where it is spent), made by ``make() -> (memory, handle)``, registered, its nonce
        written at its start (nothing is allocated in it before it is proved). If anything
        fails, nothing is left held; the region gives its bytes back when removed."""
        self.budget.take(self.kind, device, size)
        index = next_index()
        try:
            memory, handle = make()
            arena = Arena(size, align) if direction == pb.REPLY else None
            region = Region(index, self.kind, direction, device, size, memory, gpu=gpu,
                            arena=arena)
            self.add(region)
            nonce = secrets.token_bytes(NONCE_BYTES)
            region.write(0, memoryview(nonce))
        except BaseException:
            if self.remove(index) is None:   # not registered: its share is still to give back
                self.budget.give(self.kind, device, size)
            raise
        return NewRegion(region, handle, nonce)

    def all_or_none(self, makers: Iterable[Callable[[], NewRegion]]) -> list[NewRegion]:
        """The regions ``makers`` make (with ``new_region``): all of them, or, when one
        fails, none (those made are removed) and its error."""
        made: list[NewRegion] = []
        try:
            for make in makers:
                made.append(make())
        except BaseException:
            for new in made:
                self.remove(new.region.index)
            raise
        return made

    def confirm(self, region: Region) -> bool:
        """The client proved it attached to ``region``: use it (False: it cannot be)."""
        region.ready = True
        return True

    def discard(self, region: Region) -> None:
        """Let go of ``region``: a probe that did its job, or one the client could not use."""
        self.remove(region.index)

    def remove(self, index: int) -> Region | None:
        region = super().remove(index)
        if region is not None:
            self.budget.give(self.kind, region.device, region.size)
        return region
