"""The shared-memory transport: same-host tensor payloads that bypass gRPC.

A session has two arenas, each a POSIX shared-memory region the *server*
created (the server never maps a name a client sends): the request arena, in
which the client allocates and writes inputs and cotangents, and the reply
arena, in which the server allocates and writes outputs and gradients. A
``Tensor`` then carries only ``ShmRef(offset, nbytes)``, checked against the
arena's bounds before any view is made.

Lifetimes: a request slot is freed by the client once the server no longer
needs it (after the reply, or when the residual that views it is released);
a reply slot is freed only when the last array viewing it is collected (a
finalizer on the numpy owner that torch/numpy views keep alive), and the
client reports it in the next request's ``SessionState.freed``.

Both peers implement the payload interface the bytes transport consults:
``place(data) -> ShmRef | None`` (None: arena full, send bytes instead),
``check(ref, nbytes, path)`` and ``view(ref) -> memoryview``.
"""

from __future__ import annotations

import collections
import mmap
import os
import re
import secrets
import threading
import weakref
import numpy as np

from gradserve.errors import invalid
from gradserve.v1 import gradserve_pb2 as pb

SHM_DIR = "/dev/shm"
#: Payloads smaller than this travel inline: a slot costs more than the copy saves.
SHM_MIN_BYTES = 16 << 10
ALIGN = 64   # JAX's CPU zero-copy import needs 64-byte alignment
_NAME = re.compile(r"^gradserve-[0-9a-f]{32}-(probe|req|rep)$")


def available() -> bool:
    """Whether this machine has POSIX shared memory at /dev/shm."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class Arena:
    """A first-fit allocator of aligned slots in ``[0, size)``; thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]   # sorted (offset, length)
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new slot of ``nbytes`` (rounded up to ``ALIGN``), or None if full."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= need:
                    if length == need:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + need, length - need)
                    self._used[offset] = need
                    return offset
        return None

    def free(self, offset: int) -> bool:
        """Return a slot; False if ``offset`` is not an allocated slot."""
        with self._lock:
            length = self._used.pop(offset, None)
            if length is None:
                return False
            self._free.append((offset, length))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for start, size in self._free:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((start, size))
            self._free = merged
            return True

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._used.values())


def new_name(kind: str) -> str:
    """An unguessable region name for ``kind`` ("probe", "req" or "rep")."""
    return f"gradserve-{secrets.token_hex(16)}-{kind}"


def create_region(name: str, size: int) -> mmap.mmap:
    """Create (exclusively, mode 0600) and map a region; the server's side."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
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


def _check(ref: pb.ShmRef, size: int, nbytes: int, path: str) -> None:
    if ref.nbytes != nbytes:
        raise invalid(f"{path}: shared-memory slot holds {ref.nbytes} bytes but dtype x shape "
                      f"needs {nbytes}")
    if ref.offset > size or ref.nbytes > size - ref.offset:
        raise invalid(f"{path}: shared-memory slot [{ref.offset}, +{ref.nbytes}) lies outside "
                      f"the {size}-byte arena")


class _Peer:
    """One side of a session: allocates and writes in its outgoing arena, reads the other."""

    def __init__(self, outgoing: mmap.mmap, incoming: mmap.mmap, size: int):
        self.size = size
        self._outgoing = outgoing
        self._incoming = incoming
        self.arena = Arena(size)

    def place(self, data: memoryview) -> tuple[pb.ShmRef, bool] | None:
        """A slot holding ``data`` and whether it was allocated for it (then the
        caller frees it); None when ``data`` is small or the arena is full."""
        n = data.nbytes
        offset = self.arena.alloc(n) if n >= SHM_MIN_BYTES else None
        if offset is None:
            return None
        self._outgoing[offset:offset + n] = data.cast("B")
        return pb.ShmRef(offset=offset, nbytes=n), True

    def check(self, ref: pb.ShmRef, nbytes: int, path: str) -> None:
        _check(ref, self.size, nbytes, path)

    def free(self, offsets: list[int]) -> None:
        """Return outgoing slots the other side no longer needs."""
        for offset in offsets:
            self.arena.free(offset)


class ServerPeer(_Peer):
    """The server's side: reads requests in place, writes replies."""

    def __init__(self, request: mmap.mmap, reply: mmap.mmap, size: int):
        super().__init__(reply, request, size)

    def view(self, ref: pb.ShmRef) -> memoryview:
        return memoryview(self._incoming)[ref.offset:ref.offset + ref.nbytes]


class ClientPeer(_Peer):
    """The client's side: writes requests, views replies until their owners are collected."""

    def __init__(self, request: mmap.mmap, reply: mmap.mmap, size: int):
        super().__init__(request, reply, size)
        self.freed: collections.deque[int] = collections.deque()
        self._base = np.frombuffer(request, np.uint8).ctypes.data

    def place(self, data: memoryview) -> tuple[pb.ShmRef, bool] | None:
        # data that already lives in the request arena (``allocate``) is sent as it is
        if data.nbytes:
            address = np.frombuffer(data, np.uint8).ctypes.data
            if self._base <= address and address + data.nbytes <= self._base + self.size:
                return pb.ShmRef(offset=address - self._base, nbytes=data.nbytes), False
        return super().place(data)

    def allocate(self, nbytes: int) -> np.ndarray | None:
        """A uint8 array in the request arena, its slot freed when it is collected."""
        offset = self.arena.alloc(nbytes)
        if offset is None:
            return None
        owner = np.frombuffer(self._outgoing, np.uint8, nbytes, offset)
        weakref.finalize(owner, self.arena.free, offset)
        return owner

    def view(self, ref: pb.ShmRef) -> memoryview:
        owner = np.frombuffer(self._incoming, np.uint8, ref.nbytes, ref.offset)
        weakref.finalize(owner, self.freed.append, ref.offset)
        return memoryview(owner)

    def take_freed(self) -> list[int]:
        taken = []
        while self.freed:
            taken.append(self.freed.popleft())
        return taken
