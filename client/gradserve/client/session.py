"""The client's same-host session: open, attach and prove, grow, keep alive, close.

A session is made of transports (``gradserve.client.transports``), each owning
its kind of region; this module runs the session RPCs for all of them alike
and routes slot references to the transport whose region they name.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Iterable, Sequence

import grpc

from gradserve.client.transports.base import ClientTransport
from gradserve.errors import BUDGET_SPENT, REGIONS_AT_LIMIT, GradserveError, ResourceExhausted, \
    rpc
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import Data
from gradserve.wire.slots import SessionInfo, Slots

log = logging.getLogger("gradserve.client")

#: Seconds a growth that failed for a passing reason is not asked for again.
GROW_RETRY_SECONDS = 1.0


class Session(Slots[ClientTransport]):
    """A confirmed session: its transports, what the framing places payloads in and reads
    replies from, and a keep-alive thread (``start``/``close``)."""

    def __init__(self, stub: Any, session_id: str, lease: float,
                 transports: Sequence[ClientTransport], timeout: float = 10.0):
        super().__init__(transports)
        self.id = session_id
        self.lease = lease
        self.timeout = timeout
        self._stub = stub
        self._grow_lock = threading.Lock()
        self._refused: dict[int, int] = {}   # kind -> smallest size refused
        self._grow_retry: dict[int, float] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        for transport in transports:   # weakly: a dropped session is freed at once
            transport.growth = weakref.WeakMethod(self.grow)

    @classmethod
    def open(cls, stub: Any, transports: Sequence[ClientTransport],
             timeout: float = 10.0) -> tuple["Session | None", dict[str, str]]:
        """Ask the server for ``transports`` and attach to the regions it makes; the session
        (None when no transport came up) and why each that did not."""
        asked = list(transports)
        try:   # asking may take resources (a UCX worker): a failed open gives them back
            request = pb.OpenSessionRequest(transports=[t.ask() for t in asked])
            opened = rpc(stub.OpenSession, request, timeout)
        except BaseException:
            for transport in asked:
                transport.close()
            raise
        session = cls(stub, opened.session_id, opened.lease_seconds, asked, timeout)
        by_kind = {t.kind: t for t in asked}

        def refused(refusals: Iterable[pb.TransportRefusal]) -> dict[str, str]:
            return {by_kind[r.kind].name: r.reason for r in refusals if r.kind in by_kind}

        reasons = refused(opened.refused)
        try:
            for transport in asked:
                if not any(r.kind == transport.kind for r in opened.regions):
                    reasons.setdefault(transport.name, "the server made no regions for it")
            regions = list(opened.regions)
            for _ in ("probes", "their regions"):   # proving the probes brings the regions
                if not regions:
                    break
                proved, failures = session._prove(regions)
                reasons.update(failures)
                reasons.update(refused(proved.refused))
                regions = list(proved.regions)
            session.transports = [t for t in asked if t.usable]
            for transport in asked:
                if not transport.usable:
                    reasons.setdefault(transport.name, "the server refused its regions")
                    transport.close()
        except BaseException:
            session.close()   # its transports are still every one asked for
            raise
        if not session.transports:
            session.close()
            return None, reasons
        return session, reasons

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Start pinging the server every third of the lease, until ``close``."""
        if self._thread is not None:
            return
        # the thread holds no reference to the session: a client dropped without close()
        # stops pinging, and the server ends the session when its lease runs out
        weakref.finalize(self, self._stopped.set)
        self._thread = threading.Thread(target=_keep_alive, name="gradserve-keepalive",
                                        daemon=True,
                                        args=(self._stub, self.id, self.lease, self._stopped))
        self._thread.start()

    def close(self, tell_server: bool = True) -> None:
        """Stop the keep-alive and end the session on the server (best effort)."""
        if self._closed:
            return
        self._closed = True
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease / 3 + 1)
        for transport in self.transports:
            transport.close()
        if tell_server:
            try:
                self._stub.CloseSession(pb.SessionRequest(session_id=self.id), timeout=1.0)
            except grpc.RpcError:
                pass   # the lease ends it anyway

    # -- growth ------------------------------------------------------------
    def grow(self, transport: ClientTransport, min_bytes: int, seen: int) -> bool:
        """Add a pair of regions of ``transport``'s kind that can hold ``min_bytes``,
        unless regions were added since the caller saw ``seen``. A size the server
        refused is not asked for again (regions never shrink, so nothing larger would
        fit either); once the server says its limit is reached, nothing is. What does
        not fit travels as bytes."""
        kind = transport.kind
        with self._grow_lock:
            if len(transport.regions) > seen:
                return True
            if (min_bytes >= self._refused.get(kind, 1 << 63)
                    or time.monotonic() < self._grow_retry.get(kind, 0.0)):
                return False
            try:
                grown = rpc(self._stub.GrowSession,
                            pb.GrowSessionRequest(session_id=self.id, min_bytes=min_bytes,
                                                  kind=kind), self.timeout)
                _, failures = self._prove(list(grown.regions))
                if failures:
                    raise GradserveError("; ".join(failures.values()))
            except ResourceExhausted as err:
                if err.reason == BUDGET_SPENT:     # the server's memory: it may free up
                    self._grow_retry[kind] = time.monotonic() + GROW_RETRY_SECONDS
                else:
                    self._refused[kind] = 0 if err.reason == REGIONS_AT_LIMIT else min_bytes
                log.info("gradserve: %s regions do not grow for %d bytes (%s); such payloads "
                         "travel as bytes", transport.label, min_bytes, err.message)
                return False
            except GradserveError as err:
                transport.confirmed({r.index for r in transport.regions if r.ready})
                self._grow_retry[kind] = time.monotonic() + GROW_RETRY_SECONDS
                log.info("gradserve: could not grow the %s regions (%s); trying again later",
                         transport.label, err)
                return False
            return True

    def _prove(self, regions: list[pb.Region]) -> tuple[pb.ConfirmSessionResponse,
                                                        dict[str, str]]:
        """Attach to the server's new ``regions`` (each by its transport) and send what was
        read back; every region is proved or (an empty nonce) dropped, so none lingers
        half-made. The server's answer (its ready regions used, the others forgotten) and
        why attaching failed, by transport name."""
        proofs: list[pb.RegionProof] = []
        failures: dict[str, str] = {}
        for transport in self.transports:
            mine = [r for r in regions if r.kind == transport.kind]
            if mine:
                made, failed = transport.attach(mine)
                proofs.extend(made)
                if failed:
                    failures[transport.name] = "; ".join(failed)
        proved = rpc(self._stub.ConfirmSession,
                     pb.ConfirmSessionRequest(session_id=self.id, proofs=proofs), self.timeout)
        ready = set(proved.ready)
        for transport in self.transports:
            transport.confirmed(ready)
        return proved, failures

    # -- per call ----------------------------------------------------------
    def state(self) -> pb.SessionState:
        """This session's id and the reply slots freed since the last request."""
        state = pb.SessionState(id=self.id)
        for transport in self.transports:
            state.freed_slots.extend(transport.take_freed())
        return state

    def put_back(self, refs: Iterable[pb.SlotRef]) -> None:
        """Report these reply slots freed with the next request (the request that carried
        them failed, or a reply that named them was never read)."""
        for ref in refs:
            transport = self.transport_of(ref.region)
            if transport is not None:
                transport.put_back([ref])

    def has_freed(self) -> bool:
        """Whether reply slots wait to be reported freed."""
        return any(t.pending_frees for t in self.transports)

    def link_broke(self, why: str) -> None:
        """The server found the session's link broken: send bytes until it is set up anew."""
        for transport in self.transports:
            transport.link_broke(why)

    @property
    def broken_at(self) -> float | None:
        """When a transport of the session stopped working (None: all work)."""
        times = [t.broken_at for t in self.transports if t.broken_at is not None]
        return min(times) if times else None

    def spilled(self, nbytes: int) -> None:
        """A reply came partly as bytes for want of reply slots: let transports grow."""
        for transport in self.transports:
            transport.spilled(nbytes)

    def allocate(self, nbytes: int, gpu: int | None) -> Data | None:
        """Bytes in a request slot on ``gpu`` (None: host memory), or None."""
        for transport in self.transports:
            data = transport.allocate(nbytes, gpu)
            if data is not None:
                return data
        return None

    def info(self) -> SessionInfo:
        """A snapshot: transports, regions, pending frees, copy counters."""
        transports = self.transports
        return SessionInfo(self.id, tuple(t.name for t in transports),
                           tuple(r.info() for t in transports for r in t.regions),
                           sum(t.pending_frees for t in transports),
                           sum(t.copied for t in transports), sum(t.in_place for t in transports),
                           sum(t.in_flight() for t in transports))


def _keep_alive(stub: Any, sid: str, lease: float, stopped: threading.Event) -> None:
    """Ping the server every third of the lease until ``stopped`` or the session is gone."""
    while not stopped.wait(lease / 3):
        try:
            if not stub.KeepAlive(pb.SessionRequest(session_id=sid), timeout=lease / 3).open:
                return   # gone: the next call gets SessionMissing and reopens
        except grpc.RpcError as err:
            log.debug("keep-alive of session %s failed: %s", sid, err)
