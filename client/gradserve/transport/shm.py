"""The shared-memory transport: same-host tensor payloads that bypass gRPC.

A session has two arenas, each a list of POSIX shared-memory regions
(segments) the *server* created (the server never maps a name a client
sends): the request arena, in which the client allocates and writes inputs
and cotangents, and the reply arena, in which the server allocates and writes
outputs and gradients. A ``Tensor`` then carries only ``ShmRef(segment,
offset, nbytes)``, checked against the segment's bounds before any view is
made. Arenas grow by whole segments (``GrowSession``), never by remapping,
so views of existing slots stay valid.

Regions are created with ``posix_fallocate``: a /dev/shm too small for them
fails at creation (then the payload travels as bytes) instead of killing a
process with SIGBUS on its first write.

Lifetimes: a request slot is freed by the client once the server no longer
needs it (after the reply, or when the residual that views it is released);
a reply slot is freed only when the last array viewing it is collected (a
finalizer on the numpy owner that torch/numpy views keep alive), and the
client reports it in the next request's ``SessionState.freed``.

Both sides are ``transport.Peer``s of kind "shm".
"""

from __future__ import annotations

import collections
import mmap
import os
import re
import secrets
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from gradserve.transport.arena import Arena, check_slot
from gradserve.v1 import gradserve_pb2 as pb

SHM_DIR = "/dev/shm"
#: Payloads smaller than this travel inline: a slot costs more than the copy saves.
SHM_MIN_BYTES = 16 << 10
_NAME = re.compile(r"^gradserve-[0-9a-f]{32}-(probe|req|rep)$")


def available() -> bool:
    """Whether this machine has POSIX shared memory at /dev/shm."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def new_name(kind: str) -> str:
    """An unguessable region name for ``kind`` ("probe", "req" or "rep")."""
    return f"gradserve-{secrets.token_hex(16)}-{kind}"


def create_region(name: str, size: int) -> mmap.mmap:
    """Create (exclusively, mode 0600), reserve and map a region; the server's side.

    Raises OSError (ENOSPC) when /dev/shm cannot hold ``size`` bytes.
    """
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def open_region(name: str, size: int) -> mmap.mmap:
    """Map a region the server created; refuses names that are not gradserve's."""
    if not _NAME.match(name):
        raise ValueError(f"refusing to map {name!r}: not a gradserve region name")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"region {name!r} is not {size} bytes")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


Slot = tuple[int, int]   # (segment, offset)


@dataclass
class _Segment:
    """One region of each arena, the same size: ours (we allocate) and the peer's."""

    outgoing: mmap.mmap
    incoming: mmap.mmap
    arena: Arena
    base: int            # address of ``outgoing``
    ready: bool          # False until the peer has mapped it: nothing is placed there


class _Peer:
    """One side of a session: allocates and writes in its outgoing arena, reads the other."""

    kind = "shm"
    min_bytes = SHM_MIN_BYTES

    def __init__(self, outgoing: mmap.mmap, incoming: mmap.mmap, size: int):
        self.segments: list[_Segment] = []
        self.add_segment(outgoing, incoming, size)

    def add_segment(self, outgoing: mmap.mmap, incoming: mmap.mmap, size: int,
                    ready: bool = True) -> int:
        """Append a segment to both arenas; returns its index."""
        base = np.frombuffer(outgoing, np.uint8).ctypes.data
        self.segments.append(_Segment(outgoing, incoming, Arena(size), base, ready))
        return len(self.segments) - 1

    @property
    def size(self) -> int:
        """Bytes in each arena, all segments together."""
        return sum(s.arena.size for s in self.segments)

    @property
    def used_bytes(self) -> int:
        """Bytes of the outgoing arena in allocated slots."""
        return sum(s.arena.used_bytes for s in self.segments)

    def alloc(self, nbytes: int) -> Slot | None:
        """A slot of ``nbytes`` in the outgoing arena (first segment that fits), or None."""
        for index, segment in enumerate(list(self.segments)):
            offset = segment.arena.alloc(nbytes) if segment.ready else None
            if offset is not None:
                return index, offset
        return None

    def accepts(self, data: Any) -> bool:
        return isinstance(data, memoryview)

    def place(self, data: memoryview) -> tuple[pb.ShmRef, bool] | None:
        """A slot holding ``data`` and whether it was allocated for it (then the
        caller frees it); None when the arena is full."""
        n = data.nbytes
        slot = self.alloc(n)
        if slot is None:
            return None
        segment, offset = slot
        self.segments[segment].outgoing[offset:offset + n] = data.cast("B")
        return pb.ShmRef(segment=segment, offset=offset, nbytes=n), True

    def flush(self) -> None:
        pass   # stores to shared memory are visible to the peer once the RPC is sent

    def check(self, ref: pb.ShmRef, nbytes: int, path: str) -> None:
        """Refuse a reference that does not fit inside one of the incoming segments."""
        check_slot(path, "shared-memory", "segment", ref.segment,
                   [s.arena.size for s in self.segments], ref.offset, ref.nbytes, nbytes)

    def free(self, refs: Iterable[pb.ShmRef]) -> None:
        """Return outgoing slots the other side no longer needs (unknown ones are ignored)."""
        for ref in refs:
            if ref.segment < len(self.segments):
                self.segments[ref.segment].arena.free(ref.offset)


class ServerPeer(_Peer):
    """The server's side: reads requests in place, writes replies."""

    def __init__(self, request: mmap.mmap, reply: mmap.mmap, size: int):
        super().__init__(reply, request, size)

    def view(self, ref: pb.ShmRef) -> memoryview:
        return memoryview(self.segments[ref.segment].incoming)[ref.offset:ref.offset + ref.nbytes]


class ClientPeer(_Peer):
    """The client's side: writes requests, views replies until their owners are collected.

    ``grow(nbytes, seen) -> bool`` (set by the session) adds a segment able to
    hold ``nbytes`` when the request arena is full.
    """

    def __init__(self, request: mmap.mmap, reply: mmap.mmap, size: int):
        super().__init__(request, reply, size)
        self.freed: collections.deque[Slot] = collections.deque()
        self.grow: Callable[[int], bool] | None = None

    def alloc(self, nbytes: int) -> Slot | None:
        seen = len(self.segments)
        slot = super().alloc(nbytes)
        if slot is None and self.grow is not None and self.grow(nbytes, seen):
            slot = super().alloc(nbytes)
        return slot

    def place(self, data: memoryview) -> tuple[pb.ShmRef, bool] | None:
        # data that already lives in the request arena (``allocate``) is sent as it is
        if data.nbytes:
            address = np.frombuffer(data, np.uint8).ctypes.data
            for index, segment in enumerate(self.segments):
                if segment.base <= address and address + data.nbytes <= segment.base + segment.arena.size:
                    return pb.ShmRef(segment=index, offset=address - segment.base,
                                     nbytes=data.nbytes), False
        return super().place(data)

    def allocate(self, nbytes: int) -> np.ndarray | None:
        """A uint8 array in the request arena, its slot freed when it is collected."""
        slot = self.alloc(nbytes)
        if slot is None:
            return None
        segment, offset = slot
        owner = np.frombuffer(self.segments[segment].outgoing, np.uint8, nbytes, offset)
        weakref.finalize(owner, self.segments[segment].arena.free, offset)
        return owner

    def view(self, ref: pb.ShmRef) -> memoryview:
        owner = np.frombuffer(self.segments[ref.segment].incoming, np.uint8, ref.nbytes, ref.offset)
        weakref.finalize(owner, self.freed.append, (ref.segment, ref.offset))
        return memoryview(owner)

    def take_freed(self) -> list[pb.ShmRef]:
        """The reply slots collected since the last call, for ``SessionState.freed``."""
        taken = []
        while self.freed:
            segment, offset = self.freed.popleft()
            taken.append(pb.ShmRef(segment=segment, offset=offset))
        return taken
