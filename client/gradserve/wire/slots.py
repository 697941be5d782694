"""Slots in a session's regions: the allocator, the regions, and the data path every
region transport shares.

A same-host session has a table of regions (``pb.Region``), each reached by one
transport (shared memory, CUDA IPC, ...) and allocated in by one side: request
regions by the client, reply regions by the server. A payload placed in a
region travels as ``pb.SlotRef(region, offset, nbytes, generation)``; the
receiver checks the reference against the region before any view is made.

:class:`RegionTransport` is one side's data path over one transport's regions
(place, check, view, free); a transport module adds only how its
regions are created or attached to. :class:`Slots` is a session's transports
seen as one, which is all the framing knows of them.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Generic, Iterable, Sequence, TypeVar, Union

import grpc
import numpy as np

from gradserve.errors import SESSION_MISSING, StatusError, invalid
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import Data, DeviceBytes, address, copy_into, device_view, host_bytes

#: Slot alignment: JAX's CPU zero-copy import needs 64 bytes; device regions use 256.
ALIGN = 64
#: Bytes at the start of every new region holding the server's nonce (the client reads it back).
NONCE_BYTES = 32

KIND_NAMES: dict[int, str] = {pb.SHARED_MEMORY: "shared-memory", pb.CUDA_IPC: "CUDA IPC",
                              pb.UCX: "UCX"}
DIRECTION_NAMES: dict[int, str] = {pb.REQUEST: "request", pb.REPLY: "reply", pb.LINK: "link"}
#: Where a payload lies: a slot of a region, or a transfer over a link.
Ref = Union[pb.SlotRef, pb.Transfer]


class Arena:
    """A first-fit allocator of ``align``-aligned slots in ``[0, size)``; thread-safe.

    Each allocation gets a new *generation* (never 0), and ``free`` needs it: a
    stale free of a slot that was freed and allocated again since is refused
    instead of freeing the new one. Finalizers use ``free_later``, which never
    waits for the lock (the collector may run them inside ``alloc`` itself).
    """

    _generations = itertools.count(1)

    def __init__(self, size: int, align: int = ALIGN):
        self.align = align
        self._free: list[tuple[int, int]] = [(0, size)] if size else []   # sorted (offset, length)
        self._used: dict[int, tuple[int, int]] = {}                        # offset -> (length, gen)
        self._later: collections.deque[tuple[int, int]] = collections.deque()
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> tuple[int, int] | None:
        """``(offset, generation)`` of a new slot of ``nbytes`` (rounded up), or None if full."""
        need = max(self.align, -(-nbytes // self.align) * self.align)
        generation = next(self._generations)
        with self._lock:
            self._drain()
            for i, (offset, length) in enumerate(self._free):
                if length >= need:
                    if length == need:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + need, length - need)
                    self._used[offset] = (need, generation)
                    return offset, generation
        return None

    def free(self, offset: int, generation: int) -> bool:
        """Return the slot at ``offset`` if it is allocation ``generation``; else False."""
        with self._lock:
            self._drain()
            return self._release(offset, generation)

    def free_later(self, offset: int, generation: int) -> None:
        """``free``, now if the lock is free, else by whoever holds it next."""
        self._later.append((offset, generation))
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    @property
    def used_bytes(self) -> int:
        """Bytes in allocated slots."""
        with self._lock:
            self._drain()
            return sum(length for length, _ in self._used.values())

    def _drain(self) -> None:
        while self._later:
            self._release(*self._later.popleft())

    def _release(self, offset: int, generation: int) -> bool:
        used = self._used.get(offset)
        if used is None or used[1] != generation:
            return False
        del self._used[offset]
        length, free = used[0], self._free
        i = bisect.bisect(free, (offset, 0))
        if i < len(free) and offset + length == free[i][0]:        # joins the next free run
            length += free.pop(i)[1]
        if i and free[i - 1][0] + free[i - 1][1] == offset:        # and the previous one
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + length)
        else:
            free.insert(i, (offset, length))
        return True


@dataclass(frozen=True)
class RegionInfo:
    """One region of a session as one side sees it (for introspection and tests)."""

    index: int
    kind: str          # "shared-memory", "CUDA IPC"
    direction: str     # "request", "reply"
    device: str        # "" for host memory, else the GPU's UUID
    size: int
    used_bytes: int    # in slots this side allocated (0 where the other side allocates)
    ready: bool
    address: int       # of the first byte, in this process


@dataclass(eq=False)
class Region:
    """One region of a session's table, mapped (or opened) in this process.

    ``memory`` is a writable host buffer (an ``mmap``) when ``gpu`` is None,
    else a CuPy memory object on local GPU ``gpu``. ``arena`` is set on the
    side that allocates in it.
    """

    index: int
    kind: pb.RegionKind
    direction: pb.Direction
    device: str
    size: int
    memory: Any
    gpu: int | None = None
    arena: Arena | None = None
    ready: bool = False
    base: int = field(init=False)

    def __post_init__(self) -> None:
        if self.gpu is not None:
            self.base = int(self.memory.ptr)
        else:
            self.base = address(memoryview(self.memory)) if self.size else 0

    def holds(self, start: int, nbytes: int) -> bool:
        """Whether ``[start, start + nbytes)`` (addresses in this process) lies inside."""
        return self.base <= start and start + nbytes <= self.base + self.size

    def write(self, offset: int, data: Data) -> None:
        """Copy ``data`` to ``offset`` (GPU copies are queued: ``synchronize`` before sending)."""
        copy_into(self.view(offset, data.nbytes), data)

    def view(self, offset: int, nbytes: int) -> Data:
        """The bytes at ``[offset, offset + nbytes)``, without a copy."""
        return self.owner(offset, nbytes)[1]

    def owner(self, offset: int, nbytes: int) -> tuple[Any, Data]:
        """An array over the slot that keeps the region's memory alive, and its bytes."""
        if self.gpu is None:
            array = np.frombuffer(self.memory, np.uint8, nbytes, offset)
            return array, host_bytes(array)
        data = device_view(self.memory, offset, nbytes, self.gpu)
        return data.array, data

    def info(self) -> RegionInfo:
        """A snapshot for introspection."""
        return RegionInfo(self.index, KIND_NAMES.get(self.kind, str(self.kind)),
                          DIRECTION_NAMES.get(self.direction, str(self.direction)), self.device,
                          self.size, self.arena.used_bytes if self.arena else 0, self.ready,
                          self.base)


@dataclass(frozen=True)
class SessionInfo:
    """A same-host session as one side sees it (``Client.session_info()``,
    ``Server.sessions.info(id)``)."""

    id: str
    transports: tuple[str, ...]
    regions: tuple[RegionInfo, ...]
    pending_frees: int = 0      # reply slots freed by the client, not yet reported to the server
    copied: int = 0             # payloads this side copied into a slot of its regions
    in_place: int = 0           # payloads this side sent from the slot they lay in already
    transfers: int = 0          # transfers over links this side has not let go of yet

    def used_bytes(self, direction: str) -> int:
        """Bytes in allocated slots of the ``direction`` ("request", "reply") regions."""
        return sum(r.used_bytes for r in self.regions if r.direction == direction)

    def sizes(self, kind: str, direction: str) -> list[int]:
        """Sizes of the regions of one kind and direction, in table order."""
        return [r.size for r in self.regions if r.kind == kind and r.direction == direction]


def check_slot(path: str, label: str, region: Region | None, incoming: int,
               ref: pb.SlotRef, want: int, align: int) -> None:
    """Refuse ``ref`` unless it holds exactly ``want`` bytes inside ``region``, a region in
    use whose direction is ``incoming`` (None: no such region), at an offset that is a
    multiple of ``align`` (the dtype's item size: a misaligned GPU read is a fatal error)."""
    index = ref.region
    if ref.nbytes != want:
        raise invalid(f"{path}: {label} slot holds {ref.nbytes} bytes but dtype x shape "
                      f"needs {want}")
    if region is None or not region.ready:
        raise invalid(f"{path}: {label} region {index} is not in use in this session")
    if region.direction != incoming:
        raise invalid(f"{path}: {label} region {index} is a {DIRECTION_NAMES[region.direction]} "
                      f"region; this side reads only {DIRECTION_NAMES[incoming]} regions")
    if ref.offset > region.size or ref.nbytes > region.size - ref.offset:
        raise invalid(f"{path}: {label} slot [{ref.offset}, +{ref.nbytes}) lies outside the "
                      f"{region.size}-byte region {index}")
    if align > 1 and ref.offset % align:
        raise invalid(f"{path}: {label} slot offset {ref.offset} is not a multiple of the "
                      f"dtype's {align}-byte item size")


class RegionTransport:
    """One side's data path over one transport's regions in a session.

    This side allocates and writes in its *outgoing* regions (``outgoing``:
    pb.REQUEST on the client, pb.REPLY on the server) and reads the other
    side's slots in the *incoming* ones. Subclasses (one module per
    transport and side) add how regions come to exist and go away.
    """

    kind: pb.RegionKind = pb.REGION_KIND_UNSPECIFIED
    #: the transport's name, as users ask for it (``transport="shm"``)
    name: str = ""
    #: Payloads smaller than this are not copied into a slot (they go inline): a slot
    #: costs more than the copy saves. Those already in a slot are sent as they are.
    min_bytes: int = 1
    #: whether payloads go out of band (a link), not into memory the peer maps
    out_of_band = False

    def __init__(self, outgoing: pb.Direction):
        self.outgoing = outgoing
        self._regions: dict[int, Region] = {}
        self._lock = threading.Lock()
        #: payloads copied into a slot / sent from where they already lay
        self.copied = 0
        self.in_place = 0

    @property
    def label(self) -> str:
        """The transport's name in messages."""
        return KIND_NAMES.get(self.kind, f"kind-{self.kind}")

    # -- the region table --------------------------------------------------
    def add(self, region: Region) -> None:
        """Take part of the session's table: ``region`` (ready or not)."""
        with self._lock:
            self._regions[region.index] = region

    def remove(self, index: int) -> Region | None:
        """Forget a region (it is no longer used); returns it."""
        with self._lock:
            return self._regions.pop(index, None)

    def region(self, index: int) -> Region | None:
        """The region with table index ``index``, if it is this transport's."""
        return self._regions.get(index)

    @property
    def regions(self) -> list[Region]:
        """Every region of this transport, in table order (indices only grow)."""
        with self._lock:
            return list(self._regions.values())

    def _outgoing_on(self, gpu: int | None) -> list[Region]:
        return [r for r in self.regions
                if r.ready and r.direction == self.outgoing and r.gpu == gpu and r.arena]

    def take_slot(self, nbytes: int, gpu: int | None,
                  regions: list[Region] | None = None) -> tuple[Region, int, int] | None:
        """``(region, offset, generation)`` of a new slot of ``nbytes`` in an outgoing region
        on ``gpu`` (None: host; ``regions``: those, where the caller has them), asking
        ``make_room`` once when they are full; None when no slot can be had (or this
        transport has no such region)."""
        regions = self._outgoing_on(gpu) if regions is None else regions
        taken = _first_fit(regions, nbytes)
        if taken is None and regions and self.make_room(nbytes, gpu):
            taken = _first_fit(self._outgoing_on(gpu), nbytes)
        return taken

    # -- sending -----------------------------------------------------------
    def place(self, data: Data) -> tuple[Ref, bool] | None:
        """A slot holding ``data`` and whether it was allocated for it (then the sender
        frees it once the other side is done); None when this transport cannot carry it
        (too small, memory it has no region on, regions full)."""
        nbytes = data.nbytes
        gpu = data.device if isinstance(data, DeviceBytes) else None
        start = data.ptr if isinstance(data, DeviceBytes) else address(data)
        regions = self._outgoing_on(gpu)
        for region in regions:   # already in a slot of ours: send it as it is
            if region.holds(start, nbytes):
                self.in_place += 1
                return pb.SlotRef(region=region.index, offset=start - region.base,
                                  nbytes=nbytes), False
        if nbytes < self.min_bytes:
            return None
        taken = self.take_slot(nbytes, gpu, regions)
        if taken is None:
            return None
        region, offset, generation = taken
        region.write(offset, data)
        self.copied += 1
        return pb.SlotRef(region=region.index, offset=offset, nbytes=nbytes,
                          generation=generation), True

    def make_room(self, nbytes: int, gpu: int | None) -> bool:
        """Called when no outgoing region has a free slot of ``nbytes``: True if room was
        made (a region was added), so placing is tried once more."""
        return False

    @property
    def on_gpu(self) -> bool:
        """Whether any region of this transport is GPU memory."""
        return any(r.gpu is not None for r in self.regions)

    def free(self, refs: Iterable[Ref]) -> None:
        """Return outgoing slots the other side no longer needs (unknown ones, and slots
        sent from where their data lay, generation 0, are ignored)."""
        for ref in refs:
            region = self._regions.get(ref.region)
            if (isinstance(ref, pb.SlotRef) and region is not None and region.arena is not None
                    and region.direction == self.outgoing):
                region.arena.free_later(ref.offset, ref.generation)

    def settle(self, refs: Iterable[Ref]) -> None:
        """Wait until the peer took what ``refs`` sent out of band (slots: nothing to do)."""

    # -- receiving ---------------------------------------------------------
    def check(self, ref: pb.SlotRef, nbytes: int, path: str, align: int = 1) -> None:
        """Refuse a reference that is not an ``align``ed slot of ``nbytes`` inside an
        incoming region in use."""
        incoming = pb.REPLY if self.outgoing == pb.REQUEST else pb.REQUEST
        check_slot(path, self.label, self._regions.get(ref.region), incoming, ref, nbytes, align)

    def receive(self, ref: pb.Transfer, nbytes: int, path: str) -> None:
        """Check a transfer of ``nbytes`` a message names and start receiving it."""
        raise invalid(f"{path}: region {ref.region} is a {self.label} region, not a link")

    def drop(self, ref: Ref) -> None:
        """Stop receiving a transfer that will not be viewed (regions: nothing to do)."""

    def view(self, ref: Ref) -> Data:
        """The incoming bytes ``ref`` designates (checked), without a copy."""
        assert isinstance(ref, pb.SlotRef)
        return self.region_of(ref).view(ref.offset, ref.nbytes)

    def region_of(self, ref: pb.SlotRef) -> Region:
        """The region a checked reference names; SESSION_MISSING if the session ended since."""
        region = self._regions.get(ref.region)
        if region is None:
            raise _ended(f"{self.label} region {ref.region}")
        return region

    def in_flight(self) -> int:
        """Transfers over links not let go of yet (regions have none)."""
        return 0

    def close(self) -> None:
        """The session ended: let go of every region (arrays viewing one keep its memory)."""
        for region in self.regions:
            self.remove(region.index)


def _first_fit(regions: list[Region], nbytes: int) -> tuple[Region, int, int] | None:
    for region in regions:
        assert region.arena is not None
        slot = region.arena.alloc(nbytes)
        if slot is not None:
            return region, *slot
    return None


def _ended(what: str) -> StatusError:
    """The error for a reference into a region its session let go of during the call."""
    return StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"{what} is no longer in use: the session ended during the call",
                       SESSION_MISSING)


T = TypeVar("T", bound=RegionTransport)


class Slots(Generic[T]):
    """A session's transports as one store of slots: what the framing writes payloads
    to (``place``, ``free``) and reads them from (``check``, ``view``)."""

    def __init__(self, transports: Sequence[T]):
        self.transports: list[T] = list(transports)

    @property
    def inline_below(self) -> int:
        """Bytes payloads smaller than this were sent so by choice, not for want of a slot
        in host memory (the smallest payload a host-memory transport takes)."""
        return min((t.min_bytes for t in self.transports
                    if any(r.gpu is None for r in t.regions)), default=1 << 62)

    def transport_of(self, index: int) -> T | None:
        """The transport holding region ``index``."""
        for transport in self.transports:
            if transport.region(index) is not None:
                return transport
        return None

    def place(self, data: Data, out_of_band: bool = True) -> tuple[Ref, bool] | None:
        """Where ``data`` goes in the first transport that can carry it (links only when
        ``out_of_band``), or None."""
        for transport in self.transports:
            if out_of_band or not transport.out_of_band:
                placed = transport.place(data)
                if placed is not None:
                    return placed
        return None

    def free(self, refs: Iterable[Ref]) -> None:
        """Return slots of this side's outgoing regions, and let go of sends."""
        for ref in refs:
            transport = self.transport_of(ref.region)
            if transport is not None:
                transport.free([ref])

    def settle(self, refs: Iterable[Ref]) -> None:
        """Wait until the peer took what ``refs`` sent out of band, then let go of it."""
        refs = list(refs)
        for transport in self.transports:
            if transport.out_of_band:
                transport.settle([r for r in refs if transport.region(r.region) is not None])

    def receive(self, ref: pb.Transfer, nbytes: int, path: str) -> None:
        """Check a transfer a message names and start receiving it."""
        transport = self.transport_of(ref.region)
        if transport is None:
            raise invalid(f"{path}: link {ref.region} is not in use in this session")
        transport.receive(ref, nbytes, path)

    def drop(self, ref: Ref) -> None:
        """Stop receiving a transfer that will not be viewed."""
        transport = self.transport_of(ref.region)
        if transport is not None:
            transport.drop(ref)

    def check(self, ref: pb.SlotRef, nbytes: int, path: str, align: int = 1) -> None:
        """Refuse a reference that no transport of the session can read."""
        transport = self.transport_of(ref.region)
        if transport is None:
            raise invalid(f"{path}: region {ref.region} is not in use in this session")
        transport.check(ref, nbytes, path, align)

    def view(self, ref: Ref) -> Data:
        """The bytes of a checked reference."""
        transport = self.transport_of(ref.region)
        if transport is None:
            raise _ended(f"region {ref.region}")
        return transport.view(ref)
