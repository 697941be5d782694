"""What every server-side transport module implements: :class:`ServerTransport`.

A transport module (``shm``, ``cuda_ipc``) owns the server's side of one kind
of region from start to end: creating the regions a client asks for (with a
random nonce at the start of each, which the client must read back), growing
them, using a region once its nonce came back, and letting go of everything
when the session ends. The data path (place, check, view, free) is the shared
:class:`~gradserve.wire.slots.RegionTransport`; the generic
:class:`~gradserve.server.sessions.SessionManager` runs the RPCs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from gradserve.errors import StatusError
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.slots import ALIGN, NONCE_BYTES, Arena, Region, RegionTransport


class Refusal(Exception):
    """Why a session gets no regions of a transport (told to the client, not an error)."""


@dataclass(frozen=True)
class SessionSettings:
    """The server's bounds on same-host sessions (see ``Server``)."""

    shm_region_bytes: int = 16 << 20       # each shared-memory region of a new session
    max_shm_bytes: int = 4 << 30           # all of a session's request (or reply) regions
    cuda_pool_bytes: int = 256 << 20       # each CUDA IPC pool, unless the client asks
    max_cuda_pool_bytes: int = 4 << 30     # the most a client may ask for
    lease: float = 30.0                    # seconds a session lives unheard of


@dataclass(frozen=True)
class NewRegion:
    """A region just created, with what the client needs to attach and prove it."""

    region: Region
    handle: bytes
    nonce: bytes

    def to_pb(self) -> pb.Region:
        """The table entry sent to the client."""
        r = self.region
        return pb.Region(index=r.index, kind=r.kind, direction=r.direction, nbytes=r.size,
                         device=r.device, handle=self.handle)


#: Gives the next free index of the session's region table.
NextIndex = Callable[[], int]


class ServerTransport(RegionTransport):
    """The server's side of one same-host transport in a session."""

    def __init__(self, settings: SessionSettings):
        super().__init__(pb.REPLY)
        self.settings = settings
        self._nonce_slots: dict[int, tuple[int, int]] = {}

    @classmethod
    def create(cls, request: pb.TransportRequest, settings: SessionSettings,
               next_index: NextIndex) -> tuple["ServerTransport", list[NewRegion]]:
        """The transport and its first regions, as ``request`` asks; ``Refusal`` says why not."""
        raise NotImplementedError

    def grow(self, request: pb.GrowSessionRequest, next_index: NextIndex) -> list[NewRegion]:
        """More regions that can hold ``request.min_bytes``; RESOURCE_EXHAUSTED where not."""
        raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.label} regions do not grow; their size is fixed per session")

    def new_region(self, index: int, direction: pb.Direction, size: int, memory: Any, *,
                   device: str = "", gpu: int | None = None, handle: bytes = b"",
                   align: int = ALIGN) -> NewRegion:
        """Register a region created by the subclass: its nonce written at its start (and,
        in a reply region, its slot reserved until the client proves it read it)."""
        arena = Arena(size, align) if direction == pb.REPLY else None
        region = Region(index, self.kind, direction, device, size, memory, gpu=gpu, arena=arena)
        nonce = secrets.token_bytes(NONCE_BYTES)
        region.write(0, memoryview(nonce))
        if arena is not None:   # the nonce's slot, until the client proved it read it
            self._nonce_slots[index] = arena.alloc(NONCE_BYTES) or (0, 0)
        self.add(region)
        return NewRegion(region, handle, nonce)

    def confirm(self, region: Region) -> None:
        """The client proved it attached to ``region``: use it."""
        offset, generation = self._nonce_slots.pop(region.index, (0, 0))
        if region.arena is not None and generation:
            region.arena.free(offset, generation)
        region.ready = True

    def discard(self, region: Region) -> None:
        """The client could not attach to ``region``: let it go."""
        self.remove(region.index)
