"""The shared-memory transport, server side: the regions same-host clients map.

Every region is created here, exclusively (mode 0600) under an unguessable
name, and reserved with ``posix_fallocate``: a /dev/shm too small for it fails
at creation (the client is told, and sends bytes) instead of killing a process
with SIGBUS on its first write. A name is unlinked as soon as the client has
proved it mapped the region (or could not), so nothing is left in /dev/shm
whichever process dies; the memory lives on while either side maps it.
Regions come in pairs (request, reply) of one size; a session grows by a
pair that doubles its total, up to ``SessionSettings.max_shm_bytes``.
"""

from __future__ import annotations

import mmap
import os
import secrets

import grpc

from gradserve.client.transports.shm import SHM_DIR, SHM_MIN_BYTES, available
from gradserve.errors import REGIONS_AT_LIMIT, StatusError, invalid
from gradserve.server.transports.base import NewRegion, NextIndex, Refusal, ServerTransport, \
    SessionSettings
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.slots import ALIGN, Region

#: The smallest region a session gets: a page, and room for the nonce and a slot.
MIN_REGION_BYTES = 4096


def new_name(kind: str) -> str:
    """An unguessable region name for ``kind`` ("req" or "rep")."""
    return f"gradserve-{secrets.token_hex(16)}-{kind}"


def create_region(name: str, size: int) -> mmap.mmap:
    """Create (exclusively, mode 0600), reserve and map a region.

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


def unlink(name: str) -> None:
    """Remove a region's name (its memory stays while mapped)."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


class ShmTransport(ServerTransport):
    """A session's shared-memory regions."""

    name = "shm"
    kind = pb.SHARED_MEMORY
    min_bytes = SHM_MIN_BYTES

    def __init__(self, settings: SessionSettings):
        super().__init__(settings)
        self._names: dict[int, str] = {}   # region -> name not yet unlinked

    @classmethod
    def create(cls, request: pb.TransportRequest, settings: SessionSettings,
               next_index: NextIndex) -> tuple["ShmTransport", list[NewRegion]]:
        why = available()
        if why:
            raise Refusal(f"the server cannot use shared memory: {why}")
        size = request.region_bytes or settings.shm_region_bytes
        if not MIN_REGION_BYTES <= size <= settings.max_shm_bytes:
            raise Refusal(f"regions of {size} bytes asked for; this server allows "
                          f"{MIN_REGION_BYTES} to {settings.max_shm_bytes}")
        transport = cls(settings)
        try:
            return transport, transport._pair(size, next_index)
        except OSError as err:
            raise Refusal(f"cannot create {size} bytes of shared memory: {err}") from None

    def grow(self, request: pb.GrowSessionRequest, next_index: NextIndex) -> list[NewRegion]:
        total, limit = self.size, self.settings.max_shm_bytes
        room = (limit - total) // ALIGN * ALIGN
        if request.min_bytes == 0:
            raise invalid("GrowSession needs min_bytes > 0")
        if room < MIN_REGION_BYTES or request.min_bytes > room:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"cannot grow the shared-memory regions by {request.min_bytes} "
                              f"bytes: they hold {total} of this server's limit of {limit}",
                              REGIONS_AT_LIMIT if room < MIN_REGION_BYTES else None)
        size = max(MIN_REGION_BYTES, -(-min(max(request.min_bytes, total), room) // ALIGN) * ALIGN)
        try:
            return self._pair(size, next_index)
        except OSError as err:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"cannot create {size} bytes of shared memory: {err}") from None

    def _pair(self, size: int, next_index: NextIndex) -> list[NewRegion]:
        """A request and a reply region of ``size`` bytes: both, or (OSError) none, and no
        name left behind either way."""
        names = [new_name("req"), new_name("rep")]
        made: list[NewRegion] = []
        try:
            for name, direction in zip(names, (pb.REQUEST, pb.REPLY)):
                memory = create_region(name, size)
                made.append(self.new_region(next_index(), direction, size, memory,
                                            handle=name.encode()))
        except BaseException:
            for name in names:
                unlink(name)
            for new in made:
                self.remove(new.region.index)
            raise
        for name, new in zip(names, made):
            self._names[new.region.index] = name
        return made

    def confirm(self, region: Region) -> None:
        super().confirm(region)
        self._unlink(region.index)

    def discard(self, region: Region) -> None:
        super().discard(region)
        self._unlink(region.index)

    def close(self) -> None:
        super().close()
        for index in list(self._names):
            self._unlink(index)

    def _unlink(self, index: int) -> None:
        name = self._names.pop(index, None)
        if name is not None:
            unlink(name)

    @property
    def size(self) -> int:
        """Bytes of the request regions together (the reply regions are as large)."""
        return sum(r.size for r in self.regions if r.direction == pb.REQUEST)
