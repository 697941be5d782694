"""What every client-side transport module implements: :class:`ClientTransport`.

A transport module (``shm``, ``cuda_ipc``) owns the client's side of one
kind of region from start to end: what it asks the server for (``ask``), how
it attaches to the regions it gets and proves it did (``attach``), when it
asks for more (``make_room``, ``spilled``), and which reply slots it reports
freed. The data path (place, check, view, free) is the shared
:class:`~gradserve.wire.slots.RegionTransport`; the generic
:class:`~gradserve.client.session.Session` runs the RPCs.
"""

from __future__ import annotations

import collections
import weakref
from typing import Any, Callable, Iterable

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import Data, synchronize
from gradserve.wire.slots import ALIGN, Arena, Ref, Region, RegionTransport


#: The session's side of growing (``Session.grow``): adds regions of ``transport`` that can
#: hold ``min_bytes`` unless some were added since the caller saw ``seen``; True if the
#: transport has more room now.
Grow = Callable[["ClientTransport", int, int], bool]


class ClientTransport(RegionTransport):
    """The client's side of one transport in a session."""

    #: whether it works only with a server on this host (``auto`` tries those first)
    same_host = True

    def __init__(self, region_bytes: int = 0) -> None:
        super().__init__(pb.REQUEST)
        #: size of each region asked for (0: the server's default)
        self.region_bytes = region_bytes
        #: the session's ``grow``, held weakly (the session holds this transport)
        self.growth: Callable[[], Grow | None] | None = None
        self._freed: collections.deque[pb.SlotRef] = collections.deque()
        #: whether a probe region of the server's could not be reached from here
        self.unreachable = False

    # -- set-up (each module) ----------------------------------------------
    @staticmethod
    def unavailable() -> str:
        """Why this process cannot use the transport at all ("" when it can)."""
        return ""

    def ask(self) -> pb.TransportRequest:
        """What to ask the server for in ``OpenSession``."""
        raise NotImplementedError

    def attach(self, regions: list[pb.Region]) -> tuple[list[pb.RegionProof], list[str]]:
        """Map or open the server's new regions; the proofs to send back (an empty nonce
        where attaching failed) and why each failure happened. A probe region is only
        read (its nonce) and let go of; the others join this transport."""
        proofs, failures = [], []
        for msg in regions:
            try:
                memory, gpu, nonce = self.open(msg)
            except Exception as err:   # OSError, ValueError, CUDARuntimeError
                proofs.append(pb.RegionProof(region=msg.index))
                failures.append(self.cannot_open(msg, err))
                self.unreachable = self.unreachable or msg.direction == pb.PROBE
                continue
            proofs.append(pb.RegionProof(region=msg.index, nonce=nonce))
            if msg.direction != pb.PROBE:
                arena = Arena(msg.nbytes, self.align) if msg.direction == pb.REQUEST else None
                self.add(Region(msg.index, self.kind, msg.direction, msg.device, msg.nbytes,
                                memory, gpu=gpu, arena=arena))
        return proofs, failures

    #: alignment of the slots this side allocates
    align = ALIGN

    def open(self, msg: pb.Region) -> tuple[Any, int | None, bytes]:
        """Attach to one region: its memory, its local GPU (None: host) and the nonce read
        at its start."""
        raise NotImplementedError

    def cannot_open(self, msg: pb.Region, err: Exception) -> str:
        """Why attaching to ``msg`` failed, for people."""
        return f"cannot attach to {self.label} region {msg.index}: {err}"

    def confirmed(self, ready: set[int]) -> None:
        """Use the regions the server confirmed; forget those it did not."""
        for region in self.regions:
            if region.index in ready:
                region.ready = True
            elif not region.ready:
                self.remove(region.index)

    @property
    def broken(self) -> str:
        """Why the transport stopped working ("" while it works; regions do not break)."""
        return ""

    @property
    def broken_at(self) -> float | None:
        """When it stopped working (``time.monotonic()``), if it did."""
        return None

    def link_broke(self, why: str) -> None:
        """The peer found the transport's link broken (regions have none)."""

    @property
    def usable(self) -> bool:
        """Whether any region is in use."""
        return any(r.ready for r in self.regions)

    def spilled(self, nbytes: int) -> None:
        """A reply carried ``nbytes`` as bytes that would have fit a slot: the server's
        regions were full. Grow them if this transport can."""

    def grow(self, nbytes: int) -> bool:
        """Ask the session for regions that can hold ``nbytes``; True if there is more room."""
        grow = self.growth() if self.growth is not None else None
        return grow is not None and grow(self, nbytes, len(self.regions))

    # -- sending -----------------------------------------------------------
    def allocate(self, nbytes: int, gpu: int | None) -> Data | None:
        """Bytes in a request slot on ``gpu`` (None: host), freed when they are collected."""
        taken = self.take_slot(nbytes, gpu)
        if taken is None:
            return None
        region, offset, generation = taken
        assert region.arena is not None
        owner, data = region.owner(offset, nbytes)
        weakref.finalize(owner, region.arena.free_later, offset, generation)
        return data

    # -- receiving ---------------------------------------------------------
    def view(self, ref: Ref) -> Data:
        """The reply bytes ``ref`` designates; the slot is reported freed once every array
        viewing them has been collected."""
        assert isinstance(ref, pb.SlotRef)
        owner, data = self.region_of(ref).owner(ref.offset, ref.nbytes)
        weakref.finalize(owner, self._freed.append,
                         pb.SlotRef(region=ref.region, offset=ref.offset, generation=ref.generation))
        return data

    def take_freed(self) -> list[pb.SlotRef]:
        """Reply slots collected since the last call, for ``SessionState.freed_slots``.
        GPU work still reading them is waited for first, on every GPU: a copy out of a
        pool may have been queued on another device's stream."""
        taken = []
        while self._freed:
            taken.append(self._freed.popleft())
        if taken and self.on_gpu:
            synchronize()
        return taken

    def put_back(self, refs: Iterable[pb.SlotRef]) -> None:
        """Report these freed slots again with the next call (the one that carried them failed)."""
        self._freed.extend(refs)

    @property
    def pending_frees(self) -> int:
        """Freed reply slots not yet reported to the server."""
        return len(self._freed)
