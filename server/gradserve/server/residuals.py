"""The residual store: what Forward keeps for Vjp, bounded in bytes and age.

Entries are evicted least-recently-used when the byte budget is exceeded and
dropped once unused for ``ttl`` seconds. Losing an entry never breaks
correctness: the client re-sends the inputs and the server recomputes.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from gradserve.v1 import gradserve_pb2 as pb


#: Bytes charged to every residual on top of its tensors: the autograd graph or vjp closure
#: and the bookkeeping around it (about 7 KB measured for a small torch model).
RESIDUAL_OVERHEAD = 8 << 10


@dataclass
class _Entry:
    endpoint: str
    value: Any
    nbytes: int
    last_used: float
    session: str = ""
    owner: str = ""


_STOP = object()


class Dropper:
    """Frees objects on a background thread, off the path a waiting client sees.

    Freeing a large autograd graph or tensor (returning its pages) takes
    milliseconds per 64 MiB; a handler hands such objects here instead. Until
    ``start`` (and after ``stop``) objects are freed at once, by the caller.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the freeing thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gradserve-drop", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Free what is queued and end the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def drop(self, obj: Any) -> None:
        """Free ``obj`` (on the thread, when it runs)."""
        if self._thread is not None:
            self._queue.put(obj)

    def _run(self) -> None:
        while True:
            obj = self._queue.get()
            if obj is _STOP:
                return
            del obj


class ResidualStore:
    """Thread-safe LRU + TTL store of residuals keyed by unguessable ids, bounded in bytes
    (each charged its tensors plus ``overhead``, or plus the bytes of its request's structure
    and static values where those are more) and in count."""

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic,
                 max_count: int = 100_000, overhead: int = RESIDUAL_OVERHEAD):
        #: frees what calls leave behind off their path (the ``Server`` starts and stops it)
        self.dropper = Dropper()
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.overhead = overhead
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def put(self, endpoint: str, value: Any, nbytes: int, session: str = "",
            owner: str = "", structure: int = 0) -> str:
        """Keep ``value`` (of ``endpoint``, holding ``nbytes`` of tensors and ``structure``
        bytes of other values; viewing memory of same-host ``session``, if named; only
        ``owner`` may use it); returns its id, or "" when it alone exceeds the budget."""
        nbytes += max(self.overhead, structure)
        if nbytes > self.max_bytes or not self.max_count:
            return ""
        rid = secrets.token_urlsafe(16)
        with self._lock:
            now = self._clock()
            self._expire(now)
            self._entries[rid] = _Entry(endpoint, value, nbytes, now, session, owner)
            self._bytes += nbytes
            while self._bytes > self.max_bytes or len(self._entries) > self.max_count:
                self._drop(next(iter(self._entries)))
                self._evictions += 1
        return rid

    def get(self, rid: str, owner: str | None = None) -> tuple[str, Any] | None:
        """The (endpoint, value) kept under ``rid``, or None if it is gone or (where an
        ``owner`` is named) not its: another's id looks exactly like an unknown one."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(rid)
            if entry is None or (owner is not None and entry.owner != owner):
                return None
            entry.last_used = now
            self._entries.move_to_end(rid)
            return entry.endpoint, entry.value

    def release_session(self, session: str) -> int:
        """Drop the residuals that view memory of a same-host session (it ended); their
        Vjps recompute from re-sent inputs."""
        with self._lock:
            held = [rid for rid, e in self._entries.items() if e.session == session]
            for rid in held:
                self._drop(rid)
            return len(held)

    def release(self, rids: list[str], owner: str | None = None) -> int:
        """Drop the given residuals (those of ``owner``, where one is named); returns how
        many were still held."""
        with self._lock:
            present = [rid for rid in rids if rid in self._entries
                       and (owner is None or self._entries[rid].owner == owner)]
            for rid in present:
                self._drop(rid)
            return len(present)

    def stats(self, endpoint: str | None = None) -> pb.ResidualStats:
        """Counts and bytes held now (``endpoint_count``: those of ``endpoint``)."""
        with self._lock:
            self._expire(self._clock())
            per_endpoint = sum(1 for e in self._entries.values() if e.endpoint == endpoint)
            return pb.ResidualStats(count=len(self._entries), bytes=self._bytes,
                                    max_bytes=self.max_bytes, ttl_seconds=self.ttl,
                                    evictions=self._evictions, endpoint_count=per_endpoint)

    @property
    def held_bytes(self) -> int:
        """Bytes held right now, expired or not (``stats`` drops the expired first)."""
        with self._lock:
            return self._bytes

    def sweep(self) -> None:
        """Drop every residual unused for ``ttl`` seconds."""
        with self._lock:
            self._expire(self._clock())

    def clear(self) -> None:
        """Drop every residual."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _expire(self, now: float) -> None:
        while self._entries:
            rid, entry = next(iter(self._entries.items()))
            if now - entry.last_used < self.ttl:
                break
            self._drop(rid)
            self._evictions += 1

    def _drop(self, rid: str) -> None:
        entry = self._entries.pop(rid)
        self._bytes -= entry.nbytes
        self.dropper.drop(entry.value)
