"""The shared-memory transport, server side: the regions same-host clients map.

Every region is created here, exclusively (mode 0600) under an unguessable
name, and reserved with ``posix_fallocate``: a /dev/shm too small for it fails
at creation (the client is told, and sends bytes) instead of killing a process
with SIGBUS on its first write. ``OpenSession`` makes only a one-page probe;
the session's regions (a request and a reply region of one size) are made once
the probe proved the client maps this host's /dev/shm. A name is unlinked as
soon as the client proved it mapped the region (or could not); an unconfirmed
session ends within seconds. Names carry their server's token, and the server
holds a lock on a file named for it while it runs (:class:`Owner`): at start,
a server removes the regions of servers that died holding names
(:func:`sweep_stale`). A session grows by a pair of regions that doubles its
total, up to ``SessionSettings.max_shm_arena_bytes``; all sessions together take
their bytes from the server's budget.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import mmap
import os
import re
import secrets
import threading

import grpc

from gradserve.client.transports.shm import NAME, SHM_DIR, SHM_MIN_BYTES, available
from gradserve.errors import BUDGET_SPENT, REGIONS_AT_LIMIT, StatusError, invalid
from gradserve.server.transports.base import PROBE_BYTES, Budget, NewRegion, NextIndex, Refusal, \
    ServerTransport, SessionSettings
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.slots import ALIGN, Region

#: The smallest region a session gets: a page, and room for the nonce and a slot.
MIN_REGION_BYTES = 4096
_LOCK = re.compile(r"^gradserve-(?P<owner>[0-9a-f]{16})\.lock$")


def new_name(owner: str, kind: str) -> str:
    """An unguessable region name of server ``owner`` for ``kind`` ("req", "rep", "probe")."""
    return f"gradserve-{owner}-{secrets.token_hex(16)}-{kind}"


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


def _named_region(name: str, size: int) -> tuple[mmap.mmap, bytes]:
    """A new region and the handle a client opens it by (its name)."""
    return create_region(name, size), name.encode()


def unlink(name: str) -> None:
    """Remove a region's name (its memory stays while mapped)."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


class Owner:
    """A server's claim on the region names it makes: a file in /dev/shm named for its token,
    locked (``flock``) while the server runs; the kernel drops the lock when the process
    dies, however it dies."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._fd: int | None = None

    @property
    def path(self) -> str:
        """The lock file."""
        return os.path.join(SHM_DIR, f"gradserve-{self.token}.lock")

    def acquire(self) -> None:
        """Create and lock the file (under a temporary name first, so no sweeper ever sees
        it unlocked)."""
        if self._fd is not None or available():
            return
        staging = os.path.join(SHM_DIR, f".gradserve-{self.token}.lock")
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, self.path)
        self._fd = fd

    def release(self) -> None:
        """Remove and unlock the file."""
        fd, self._fd = self._fd, None
        if fd is not None:
            unlink(os.path.basename(self.path))
            os.close(fd)


#: The running servers' claims, by token ("": this process's own, see process_owner).
_OWNERS: dict[str, Owner] = {}
_OWNERS_LOCK = threading.Lock()
log = logging.getLogger("gradserve.server")


def sweep_stale() -> int:
    """Remove the regions (and lock files) this user's servers left when they died; how many
    names. Other users' files, and names whose owner still holds its lock, are left alone."""
    if available():
        return 0
    me = os.geteuid()
    owners: dict[str, list[str]] = {}
    for name in os.listdir(SHM_DIR):
        match = NAME.match(name) or _LOCK.match(name)
        try:
            if match and os.stat(os.path.join(SHM_DIR, name)).st_uid == me:
                owners.setdefault(match.group("owner"), []).append(name)
        except OSError:
            continue                    # gone meanwhile
    removed = 0
    for owner, names in owners.items():
        try:
            fd = os.open(os.path.join(SHM_DIR, f"gradserve-{owner}.lock"), os.O_RDWR)
        except FileNotFoundError:
            fd = None
        except OSError:
            continue                    # not ours to judge
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue            # its server still runs
            for name in names:
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed += 1
                except OSError:
                    pass
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def process_owner() -> str:
    """A token claimed for this process, for regions made outside a ``Server`` (which has
    its own)."""
    with _OWNERS_LOCK:
        owner = _OWNERS.get("")
        if owner is None:
            owner = _OWNERS[""] = Owner(secrets.token_hex(8))
            owner.acquire()
        return owner.token


class ShmTransport(ServerTransport):
    """A session's shared-memory regions."""

    name = "shm"
    kind = pb.SHARED_MEMORY
    min_bytes = SHM_MIN_BYTES

    def __init__(self, region_bytes: int, settings: SessionSettings, budget: Budget):
        super().__init__(region_bytes, settings, budget)
        self._names: dict[int, str] = {}   # region -> name not yet unlinked

    @classmethod
    def server_starting(cls, settings: SessionSettings) -> None:
        removed = sweep_stale()
        if removed:
            log.info("removed %d shared-memory names of servers no longer running", removed)
        if settings.owner and settings.owner not in _OWNERS:
            owner = _OWNERS[settings.owner] = Owner(settings.owner)
            owner.acquire()

    @classmethod
    def server_stopping(cls, settings: SessionSettings) -> None:
        owner = _OWNERS.pop(settings.owner, None)
        if owner is not None:
            owner.release()

    @classmethod
    def create(cls, request: pb.TransportRequest, settings: SessionSettings, budget: Budget,
               next_index: NextIndex) -> tuple["ShmTransport", list[NewRegion]]:
        why = available()
        if why:
            raise Refusal(f"the server cannot use shared memory: {why}")
        size = request.region_bytes or settings.shm_arena_bytes
        if not MIN_REGION_BYTES <= size <= settings.max_shm_arena_bytes:
            raise Refusal(f"regions of {size} bytes asked for; this server allows "
                          f"{MIN_REGION_BYTES} to {settings.max_shm_arena_bytes}")
        transport = cls(size, settings, budget)
        try:
            return transport, transport._make([("probe", pb.PROBE)], PROBE_BYTES, next_index)
        except (OSError, StatusError) as err:
            raise Refusal(f"cannot create shared memory: {err}") from None

    def regions_for(self, probe: Region, next_index: NextIndex) -> list[NewRegion]:
        try:
            return self._make([("req", pb.REQUEST), ("rep", pb.REPLY)], self.region_bytes,
                              next_index)
        except (OSError, StatusError) as err:
            raise Refusal(f"cannot create {self.region_bytes} bytes of shared memory: "
                          f"{err}") from None

    def grow(self, request: pb.GrowSessionRequest, next_index: NextIndex) -> list[NewRegion]:
        total, limit = self.size, self.settings.max_shm_arena_bytes
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
            return self._make([("req", pb.REQUEST), ("rep", pb.REPLY)], size, next_index)
        except OSError as err:   # /dev/shm full: as the budget, it may free up
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"cannot create {size} bytes of shared memory: {err}",
                              BUDGET_SPENT) from None

    def _make(self, kinds: list[tuple[str, pb.Direction]], size: int,
              next_index: NextIndex) -> list[NewRegion]:
        """Regions of ``size`` bytes, one per ``(name kind, direction)``: all of them, or
        (OSError, or RESOURCE_EXHAUSTED from the budget) none, and no name left behind.
        Each region holds its share of the budget until it is removed."""
        names = [new_name(self.settings.owner or process_owner(), kind) for kind, _ in kinds]
        try:
            made = self.all_or_none(
                functools.partial(self.new_region, next_index, direction, size,
                                  functools.partial(_named_region, name, size))
                for name, (_, direction) in zip(names, kinds))
        except BaseException:
            for name in names:
                unlink(name)
            raise
        for name, new in zip(names, made):
            self._names[new.region.index] = name
        return made

    def confirm(self, region: Region) -> bool:
        self._unlink(region.index)
        return super().confirm(region)

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

