"""UCX links: bulk data as tagged messages between two processes' UCX workers, across hosts.

The UCX transport of each side (``gradserve.client.transports.ucx``,
``gradserve.server.transports.ucx``) is this module plus how its link is set
up. A session's link is one region of its table (kind UCX, direction LINK) whose
``memory`` is a :class:`Link`: an endpoint to the peer's worker (error
handling on, so a peer that dies fails its transfers within milliseconds) and
the transfers in flight. :class:`LinkTransport` is the data path both sides
share: ``place`` sends a payload under a fresh tag, ``receive`` posts the
receive for a tag a message names (into memory allocated from the header),
``view`` waits for it, ``drop`` cancels it, ``free`` and ``settle`` let go of
sends. Each process has one UCX worker (:class:`Worker`), made by the first
link and stopped with the last.

Tags: the top 32 bits are the link's id (random, chosen by the server), the
next bit the sender's side, the low 31 bits a sequence number; 0 is the
link's proof. A received tag must carry the link's id and the peer's side, and
no tag is received twice at once.
"""

from __future__ import annotations

import collections
import functools
import itertools
import mmap
import os
import threading
import time
import weakref
from typing import Any, Iterable

import grpc
import numpy as np

from gradserve.errors import LINK_BROKEN, StatusError, invalid
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import Data, DeviceBytes, cupy, host_bytes, synchronize
from gradserve.wire.slots import Region, RegionTransport

#: Payloads smaller than this travel inline or streamed in gRPC (``$GRADSERVE_UCX_MIN_BYTES``
#: overrides it): measured with benchmarks/bench.py's UCX table (see the README).
UCX_MIN_BYTES = int(os.environ.get("GRADSERVE_UCX_MIN_BYTES", 1 << 20))
#: What gradserve sets where the environment does not (see the README): UCX warns of
#: settings ucxx makes on import that a build does not know; 512 KiB TCP segments move
#: large messages over TCP at about twice the speed of the 8 KiB default.
ENV_DEFAULTS = {
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCX_TCP_TX_SEG_SIZE": "512k",
    "UCX_TCP_RX_SEG_SIZE": "512k",
}
#: Most bytes of received host buffers, no longer viewed, that this process keeps to receive
#: into again: a fresh buffer costs its page faults on every transfer (about a quarter of a
#: 256 MiB round trip over TCP here). A link reuses only its own: a buffer never carries one
#: peer's bytes to another.
POOL_BYTES = 1 << 30
#: Bytes of transfers a link let go of that UCX may still read or write (a receive already
#: matched, a send not yet taken) before the link is closed, which ends them: their memory
#: is kept until they end, never freed or reused under UCX.
ABANDONED_BYTES = 1 << 30
#: Seconds closing a link waits for the transfers it ended to complete.
CLOSE_SECONDS = 2.0
CLIENT, SERVER = 0, 1
_SIDE_BIT = 1 << 31
_SEQ_MASK = _SIDE_BIT - 1
SIDE_NAMES = ("client", "server")


def available() -> str:
    """Why this process cannot use UCX ("" when it can)."""
    try:
        _ucx()
    except ImportError:
        return "ucxx is not installed (pip install gradserve[ucx])"
    except Exception as err:   # a wheel whose libraries do not load here
        return f"ucxx cannot load here: {err}"
    return ""


@functools.cache
def _ucx() -> Any:
    """ucxx's worker-level API, imported with gradserve's environment defaults."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from ucxx._lib import libucxx  # type: ignore[import-untyped,unused-ignore]
    return libucxx


@functools.cache
def _array() -> Any:
    """ucxx's buffer wrapper (host buffers and ``__cuda_array_interface__`` alike)."""
    _ucx()
    from ucxx._lib.arr import Array  # type: ignore[import-untyped,unused-ignore]
    return Array


def tag(link: int, side: int, sequence: int) -> int:
    """The 64-bit tag of transfer ``sequence`` sent by ``side`` over link ``link``."""
    return (link << 32) | (_SIDE_BIT if side == SERVER else 0) | (sequence & _SEQ_MASK)


class Worker:
    """This process's UCX worker and its progress thread, shared by every link:
    ``acquire`` makes it (and starts the thread) for the first user, ``release`` stops
    it after the last."""

    _lock = threading.Lock()
    _shared: "Worker | None" = None
    _users = 0

    def __init__(self) -> None:
        ucx = _ucx()
        self.context = ucx.UCXContext(feature_flags=(ucx.Feature.TAG, ucx.Feature.WAKEUP))
        self.worker = ucx.UCXWorker(self.context)
        #: how a peer reaches this worker
        self.address: bytes = self.worker.address.tobytes()

    @classmethod
    def acquire(cls) -> "Worker":
        """The process's worker, started if this is its first user."""
        with cls._lock:
            if cls._shared is None:
                worker = cls()
                worker.worker.start_progress_thread(polling_mode=False)
                cls._shared = worker
            cls._users += 1
            return cls._shared

    @classmethod
    def release(cls) -> None:
        """One user is done; the last stops the progress thread and drops the worker."""
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._shared is not None:
                cls._shared.worker.stop_progress_thread()
                cls._shared = None

    @classmethod
    def users(cls) -> int:
        """Links (and sessions being set up) using the worker now."""
        with cls._lock:
            return cls._users


class Pending:
    """One posted send or receive of ``link`` and the memory it reads or writes, kept
    alive until UCX is done with it."""

    def __init__(self, request: Any, data: Data, what: str, link: "Link"):
        self.request: Any = request
        self.data = data
        self.what = what
        self.link = link

    def wait(self, deadline: float) -> Data:
        """The bytes, once the transfer is done; UNAVAILABLE if the link broke, CANCELLED
        past ``deadline`` (``time.monotonic()``), INVALID_ARGUMENT if the peer sent more
        bytes than the message named."""
        pause = 20e-6
        while True:
            request = self.request
            if request is None:   # dropped: its call failed or was cancelled meanwhile
                raise StatusError(grpc.StatusCode.CANCELLED, f"{self.what} was cancelled")
            if request.completed:
                break
            if time.monotonic() > deadline:
                raise StatusError(grpc.StatusCode.CANCELLED,
                                  f"{self.what} did not complete within the transfer timeout")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        try:
            request.check_error()
        except Exception as err:
            name = type(err).__name__
            if isinstance(err, _ucx().UCXMessageTruncatedError):
                raise invalid(f"{self.what}: the peer sent more than the {self.data.nbytes} "
                              "bytes dtype x shape needs") from None
            self.link.broke(f"{self.what} failed: {name}: {err}")
            raise StatusError(grpc.StatusCode.UNAVAILABLE,
                              f"{self.what} failed, the UCX link is broken ({name}: {err}); "
                              "the session's next calls send bytes over gRPC", LINK_BROKEN
                              ) from None
        return self.data

    def drop(self) -> None:
        """Let go of the transfer (a wait on it ends CANCELLED); its memory goes once UCX
        is done with it."""
        request, self.request = self.request, None
        if request is not None and not request.completed:
            self.link.abandon(request, self.data)


class Pool:
    """One link's received host buffers that nothing views any more, reused by size; all
    links' together hold at most ``POOL_BYTES``."""

    _lock = threading.Lock()
    _held = 0

    def __init__(self) -> None:
        self._free: dict[int, collections.deque[mmap.mmap]] = {}
        self._closed = False

    def take(self, nbytes: int) -> np.ndarray[Any, Any]:
        """A uint8 array of ``nbytes`` (fresh memory is zeroed), given back to the pool once
        it and every view of it are collected."""
        backing = None
        with Pool._lock:
            free = self._free.get(nbytes)
            if free:
                backing = free.popleft()
                Pool._held -= nbytes
        if backing is None:
            backing = mmap.mmap(-1, nbytes)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                backing.madvise(mmap.MADV_HUGEPAGE)
        array = np.frombuffer(backing, np.uint8)
        weakref.finalize(array, _give_back, weakref.ref(self), backing)
        return array

    def give(self, backing: mmap.mmap) -> None:
        """Keep ``backing`` for reuse if it is a payload's and the pools have room (called
        by finalizers: it never waits for the lock, and drops the buffer instead)."""
        size = len(backing)
        if self._closed or not Pool._lock.acquire(blocking=False):
            return
        try:
            if self._closed or size < UCX_MIN_BYTES or Pool._held + size > POOL_BYTES:
                return
            Pool._held += size
            self._free.setdefault(size, collections.deque()).append(backing)
        finally:
            Pool._lock.release()

    def clear(self) -> None:
        """Let go of every kept buffer; keep none from now on."""
        with Pool._lock:
            self._closed = True
            Pool._held -= sum(len(b) for free in self._free.values() for b in free)
            self._free.clear()

    @classmethod
    def held(cls) -> int:
        """Bytes all pools keep now."""
        with cls._lock:
            return cls._held


def _give_back(pool: "weakref.ref[Pool]", backing: mmap.mmap) -> None:
    found = pool()
    if found is not None:
        found.give(backing)


class Link:
    """One session's UCX endpoint to its peer, as seen from ``side``, and its transfers
    in flight."""

    def __init__(self, worker: Worker, link_id: int, side: int, timeout: float):
        self.worker = worker
        self.id = link_id
        self.side = side
        self.peer = SERVER if side == CLIENT else CLIENT
        #: seconds a transfer may take
        self.timeout = timeout
        self.endpoint: Any = None
        #: why the link is unusable ("" while it works), and since when
        self.broken = ""
        self.broken_at: float | None = None
        self._sequence = itertools.count(1)
        self.lock = threading.Lock()
        self.sends: dict[int, Pending] = {}
        self.receives: dict[int, Pending] = {}
        #: the transfers of the link's proof (tag sequence 0), kept until it closes
        self.proof: dict[str, Pending] = {}
        #: host buffers to receive into
        self.pool = Pool()
        #: transfers let go of that UCX may still read or write, with their memory
        self.abandoned: list[tuple[Any, Data]] = []
        self._ended: Any = None

    def connect(self, address: bytes) -> None:
        """Make the endpoint to the peer's worker ``address``."""
        ucx = _ucx()
        self.endpoint = ucx.UCXEndpoint.create_from_worker_address(
            self.worker.worker, ucx.UCXAddress.create_from_buffer(address), True)

    def broke(self, why: str) -> None:
        """Mark the link unusable (its transfers fail; payloads go as bytes)."""
        if not self.broken:
            self.broken, self.broken_at = why, time.monotonic()

    def next_tag(self) -> int:
        """A tag no transfer of this side used before."""
        return tag(self.id, self.side, next(self._sequence))

    def send(self, data: Data, at: int) -> Pending:
        """Start sending ``data`` under tag ``at`` (GPU memory: once its device finished
        the work queued on it)."""
        if isinstance(data, DeviceBytes):
            synchronize(data.device)
            buffer: Any = data.array
        else:
            buffer = np.frombuffer(data, np.uint8)
        request = _ucx_call(self, lambda: self.endpoint.tag_send(_array()(buffer), _tag(at)))
        return Pending(request, data, f"sending {data.nbytes} bytes over UCX (tag {at:#x})",
                       self)

    def receive(self, nbytes: int, device: bool, at: int) -> Pending:
        """Post the receive of ``nbytes`` under tag ``at`` into memory of this process
        (zeroed GPU memory on the current device where ``device`` and CuPy allow, else a host
        buffer from the link's pool: zeroed, or last holding this link's own bytes)."""
        data: Data
        if device and _gpu_here():
            cp = cupy()
            array = cp.zeros(nbytes, cp.uint8)
            data, buffer = DeviceBytes(array, int(cp.cuda.runtime.getDevice())), array
        else:
            buffer = self.pool.take(nbytes)
            data = host_bytes(buffer)
        request = _ucx_call(self, lambda: self.endpoint.tag_recv(_array()(buffer), _tag(at)))
        return Pending(request, data, f"receiving {nbytes} bytes over UCX (tag {at:#x})",
                       self)

    def abandon(self, request: Any, data: Data) -> None:
        """Keep ``data`` until ``request`` completes (UCX cannot cancel a matched transfer);
        past ``ABANDONED_BYTES`` of such, close the endpoint, which ends them all."""
        with self.lock:
            self.abandoned = [*self._unfinished(), (request, data)]
            over = sum(d.nbytes for _, d in self.abandoned) > ABANDONED_BYTES
        if over:
            self.broke("too many transfers were let go of unfinished")
            self._close_endpoint()

    def _unfinished(self) -> list[tuple[Any, Data]]:
        """The abandoned transfers UCX has not completed yet (call under ``lock``)."""
        return [(r, d) for r, d in self.abandoned if not r.completed]

    def _close_endpoint(self) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is None:
            return
        self._ended = endpoint   # kept while the requests it ends finish
        if endpoint.alive:   # closing one whose peer died crashes
            try:
                endpoint.close()
            except Exception:   # the peer went meanwhile
                pass

    def close(self) -> None:
        """Cancel every transfer in flight and close the endpoint."""
        with self.lock:
            pending = [*self.sends.values(), *self.receives.values(), *self.proof.values()]
            self.sends.clear()
            self.receives.clear()
            self.proof.clear()
        for transfer in pending:
            transfer.drop()
        self.broke("the session ended")
        self.pool.clear()
        self._close_endpoint()   # ends what is still in flight; then wait for it
        deadline = time.monotonic() + CLOSE_SECONDS
        while True:
            with self.lock:
                left = self.abandoned = self._unfinished()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if left:   # never freed under UCX, even if it never ends
            _LEFT.append((self._ended, left))
        self._ended = None


#: Transfers (and their endpoint) that did not end when their link closed: kept for the
#: life of the process rather than freed while UCX might still use them.
_LEFT: list[tuple[Any, list[tuple[Any, Data]]]] = []


def _tag(at: int) -> Any:
    return _ucx().UCXXTag(at)


def _ucx_call(link: Link, start: Any) -> Any:
    """Start a UCX operation on ``link``; UNAVAILABLE (the link marked broken) if it fails."""
    if link.endpoint is None or link.broken:
        raise StatusError(grpc.StatusCode.UNAVAILABLE,
                          f"the UCX link is not usable: {link.broken or 'not connected'}",
                          LINK_BROKEN)
    try:
        return start()
    except Exception as err:
        link.broke(f"{type(err).__name__}: {err}")
        raise StatusError(grpc.StatusCode.UNAVAILABLE,
                          f"the UCX link broke ({type(err).__name__}: {err})", LINK_BROKEN
                          ) from None


def _gpu_here() -> bool:
    try:
        return bool(cupy().cuda.runtime.getDeviceCount())
    except Exception:   # no CuPy, or no driver
        return False


class LinkTransport(RegionTransport):
    """The data path over a session's UCX links, the same on both sides (a transport
    module adds how its link is set up)."""

    kind = pb.UCX
    name = "ucx"
    min_bytes = UCX_MIN_BYTES
    #: sends payloads out of band: a message naming one needs the streaming call
    out_of_band = True

    @property
    def label(self) -> str:
        return "UCX"

    def links(self) -> list[tuple[Region, Link]]:
        """Every link in use, with its region."""
        return [(r, r.memory) for r in self.regions if r.ready and not r.memory.broken]

    @property
    def broken(self) -> str:
        """Why the session's link is unusable ("" while one works)."""
        links = [r.memory for r in self.regions if r.ready]
        if links and all(link.broken for link in links):
            return str(links[0].broken)
        return ""

    @property
    def broken_at(self) -> float | None:
        """When the last working link broke, if every one did."""
        links = [r.memory for r in self.regions if r.ready]
        if links and all(link.broken_at is not None for link in links):
            return float(max(link.broken_at for link in links))
        return None

    def link_broke(self, why: str) -> None:
        """The peer found the link broken: stop using it."""
        for region in self.regions:
            region.memory.broke(why)

    # -- sending -----------------------------------------------------------
    def place(self, data: Data) -> tuple[pb.SlotRef | pb.Transfer, bool] | None:
        """Start sending ``data`` over the link; the transfer the message names, or None
        (too small, or no link works)."""
        if data.nbytes < self.min_bytes:
            return None
        for region, link in self.links():
            at = link.next_tag()
            try:
                pending = link.send(data, at)
            except StatusError:
                continue
            with link.lock:
                link.sends[at] = pending
            self.copied += 1
            return pb.Transfer(region=region.index, tag=at,
                               device=isinstance(data, DeviceBytes)), True
        return None

    def free(self, refs: Iterable[pb.SlotRef | pb.Transfer]) -> None:
        """Let go of sends (the peer is done with them, or will never be: then they are
        cancelled)."""
        for ref in refs:
            self._let_go(ref, sent=True)

    def settle(self, refs: Iterable[pb.SlotRef | pb.Transfer]) -> None:
        """Wait until the peer received every send among ``refs``, then let go of them;
        CANCELLED past the link's timeout, UNAVAILABLE if it broke."""
        sent = [r for r in refs if isinstance(r, pb.Transfer)]
        try:
            for ref in sent:
                link = self._link(ref.region)
                pending = link.sends.get(ref.tag) if link is not None else None
                if link is not None and pending is not None:
                    pending.wait(time.monotonic() + link.timeout)
        finally:
            self.free(sent)

    # -- receiving ---------------------------------------------------------
    def receive(self, ref: pb.Transfer, nbytes: int, path: str) -> None:
        """Check a transfer a message names and post its receive."""
        region = self.region(ref.region)
        if region is None or not region.ready:
            raise invalid(f"{path}: UCX link {ref.region} is not in use in this session")
        link: Link = region.memory
        if ref.tag >> 32 != link.id or bool(ref.tag & _SIDE_BIT) != (link.peer == SERVER):
            raise invalid(f"{path}: tag {ref.tag:#x} is not one the {SIDE_NAMES[link.peer]} "
                          f"of UCX link {ref.region} sends")
        if not ref.tag & _SEQ_MASK:
            raise invalid(f"{path}: tag {ref.tag:#x} is the link's proof, not a payload's")
        if not nbytes:
            raise invalid(f"{path}: an empty tensor travels inline, not as a transfer")
        with link.lock:   # named twice in one message, or by two calls at once
            if ref.tag in link.receives:
                raise invalid(f"{path}: tag {ref.tag:#x} is already being received")
            link.receives[ref.tag] = link.receive(nbytes, ref.device, ref.tag)

    def view(self, ref: pb.SlotRef | pb.Transfer) -> Data:
        """The bytes of a posted receive, once they arrived (see ``Pending.wait``)."""
        assert isinstance(ref, pb.Transfer)
        link = self._link(ref.region)
        pending = link.receives.get(ref.tag) if link is not None else None
        if link is None or pending is None:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"UCX transfer {ref.tag:#x} is not being received: the session "
                              "ended during the call")
        try:
            return pending.wait(time.monotonic() + link.timeout)
        finally:
            self.drop(ref)

    def drop(self, ref: pb.SlotRef | pb.Transfer) -> None:
        """Cancel a posted receive (never viewed: the call failed)."""
        self._let_go(ref, sent=False)

    def _let_go(self, ref: pb.SlotRef | pb.Transfer, sent: bool) -> None:
        """Drop a send (``sent``) or a receive of ``ref``'s link, cancelling it if not done."""
        link = self._link(ref.region)
        if link is not None and isinstance(ref, pb.Transfer):
            with link.lock:
                pending = (link.sends if sent else link.receives).pop(ref.tag, None)
            if pending is not None:
                pending.drop()

    def in_flight(self) -> int:
        """Sends and receives not yet let go of, on every link."""
        return sum(len(r.memory.sends) + len(r.memory.receives) for r in self.regions)

    def _link(self, index: int) -> Link | None:
        region = self.region(index)
        return region.memory if region is not None else None

    def remove(self, index: int) -> Region | None:
        region = super().remove(index)
        if region is not None:
            region.memory.close()
        return region

    #: the process's worker while this transport uses it (``use_worker``, ``close``)
    worker: Worker | None = None

    def use_worker(self) -> Worker:
        """The process's worker, held until ``close``."""
        if self.worker is None:
            self.worker = Worker.acquire()
        return self.worker

    def close(self) -> None:
        """Close every link, then let go of the worker."""
        super().close()
        worker, self.worker = self.worker, None
        if worker is not None:
            Worker.release()
