"""The replicas behind one client: what a target names, which replica a call goes to,
and keeping the set current.

A target is one address (``host:port``, ``unix:path``: one replica, as gRPC resolves
it), a list of addresses, ``ipv4:a:p,b:p`` / ``ipv6:[a]:p,[b]:p``, or ``dns:///name:port``,
which names every address the name resolves to and is resolved again every
``resolve_seconds`` and soon after a replica fails. Calls go to the less loaded of
two usable replicas picked at random (power of two choices over calls in flight).
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import weakref
from typing import Callable, Sequence

from gradserve.client.replica import SERVING, UNKNOWN, UNREACHABLE, Replica
from gradserve.errors import GradserveError

#: Port of a ``dns:///name`` target that names none.
DEFAULT_PORT = 50051
#: Seconds between two resolutions prompted by failures.
MIN_RESOLVE_SECONDS = 1.0
log = logging.getLogger("gradserve.client")


def parse_target(target: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """The fixed addresses a target names and the ``dns:`` names to resolve (each
    ``host:port``)."""
    entries = [target] if isinstance(target, str) else list(target)
    if not entries:
        raise GradserveError("no address given: a target names at least one replica")
    fixed: list[str] = []
    names: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise GradserveError(f"a replica address must be a non-empty string, got {entry!r}")
        entry = entry.strip()
        scheme, _, rest = entry.partition(":")
        if scheme in ("dns", "ipv4", "ipv6") and not rest.strip(" ,/"):
            raise GradserveError(f"{entry!r} names no address")
        if scheme == "dns" and rest:
            # dns:///host:port or dns://authority/host:port (the authority is not used)
            name = rest[2:].partition("/")[2] if rest.startswith("//") else rest
            if not name:
                raise GradserveError(f"{entry!r} names no host (dns:///host:port)")
            names.append(name)
        elif scheme in ("ipv4", "ipv6") and rest:
            fixed.extend(a.strip() for a in rest.split(",") if a.strip())
        else:
            fixed.append(entry)
    return fixed, names


def resolve(name: str) -> list[str]:
    """Every address ``host[:port]`` resolves to, as ``ip:port`` (IPv6 in brackets), sorted."""
    host, port = split_port(name)
    found = set()
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip, at = str(sockaddr[0]), int(sockaddr[1])
        found.add(f"[{ip}]:{at}" if family == socket.AF_INET6 else f"{ip}:{at}")
    return sorted(found)


def split_port(name: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``, or a bare host: the default port) as (host, port)."""
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = name.rpartition(":")
        if not sep or ":" in host:   # no port, or a bare IPv6 address
            host, port = name, ""
    try:
        return host, int(port) if port else DEFAULT_PORT
    except ValueError:
        raise GradserveError(f"{name!r}: the port must be a number") from None


class Fleet:
    """The replicas of one target and the choice among them.

    ``make(address, name)`` opens a replica (``name``: the ``dns:`` name it was found
    under, "" for a fixed address); ``start`` follows every replica's health and (for
    ``dns:`` names) resolves them again periodically on a thread; ``close`` stops that and
    closes every replica. A replica whose address is no longer resolved is retired: no new
    call goes there, but the Vjps of residuals it holds still do until they are gone (or
    it is), then it is closed.
    """

    def __init__(self, target: str | Sequence[str], make: Callable[[str, str], Replica], *,
                 resolve_seconds: float = 30.0,
                 resolver: Callable[[str], list[str]] = resolve):
        self.target = target
        self._fixed, self._names = parse_target(target)
        self._make = make
        self._resolver = resolver
        self.resolve_seconds = resolve_seconds
        self._lock = threading.Lock()
        self._replicas: list[Replica] = []
        self._retired: list[Replica] = []
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._watching = False
        self._resolved_at = 0.0
        found = self._addresses(initial=True)
        if not found:
            raise GradserveError(f"{target!r} names no replica")
        self._update(found)

    @property
    def dynamic(self) -> bool:
        """Whether the target names addresses that are resolved again over time."""
        return bool(self._names)

    def replicas(self) -> list[Replica]:
        """The replicas new calls may go to."""
        with self._lock:
            return list(self._replicas)

    def retired(self) -> list[Replica]:
        """Replicas no longer resolved, kept for the Vjps of the residuals they hold."""
        with self._lock:
            return list(self._retired)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Watch every replica's health (when there may be more than one) and, for ``dns:``
        targets, re-resolve on a thread; idempotent."""
        with self._lock:
            if self._watching or self._stopped.is_set():
                return
            self._watching = len(self._replicas) > 1 or self.dynamic
            replicas = list(self._replicas) if self._watching else []
        for replica in replicas:
            replica.watch(self._told())
        if self.dynamic and self._thread is None:
            # the thread holds the fleet weakly: a client dropped without close() is freed
            self._thread = threading.Thread(target=_resolving, args=(weakref.ref(self),
                                                                     self._stopped),
                                            name="gradserve-resolve", daemon=True)
            weakref.finalize(self, self._stopped.set)
            weakref.finalize(self, self._wake.set)
            self._thread.start()

    def close(self) -> None:
        """Stop resolving and close every replica (they stay listed, closed)."""
        with self._lock:
            self._stopped.set()
            replicas = self._replicas + self._retired
            self._retired = []
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for replica in replicas:
            replica.close()

    # -- choosing ----------------------------------------------------------
    def pick(self, avoid: set[Replica] | frozenset[Replica] = frozenset(),
             last_resort: bool = True) -> Replica | None:
        """A replica for a new call, not one of ``avoid``: the less loaded of two usable ones
        drawn at random (fewer calls in flight, then fewer sent). Without usable ones, one
        not known to be draining; then (``last_resort``) any. None if there is none."""
        with self._lock:
            replicas = [r for r in self._replicas if r not in avoid and not r.closed]
        choices = ([r for r in replicas if r.usable()]
                   or [r for r in replicas if not r.draining]
                   or (replicas if last_resort else []))
        if not choices:
            return None
        if len(choices) == 1:
            return choices[0]
        a, b = random.sample(choices, 2)
        return a if (a.in_flight, a.forwards + a.vjps) <= (b.in_flight, b.forwards + b.vjps) \
            else b

    def flush_draining(self) -> None:
        """Send the releases queued for draining and retired replicas now: no new call goes
        there to carry them, and a draining server exits as soon as it holds no residual."""
        if len(self._replicas) < 2 and not self._retired:   # a lone replica gets every call
            return
        with self._lock:
            leaving = [r for r in self._replicas if r.draining] + self._retired
        for replica in leaving:
            if replica.released and not replica.closed and replica.health != UNREACHABLE:
                replica.flush_releases(timeout=1.0)

    def failed(self) -> None:
        """A replica failed a call: resolve again soon (``dns:`` targets)."""
        if self.dynamic:
            self._wake.set()

    # -- keeping the set current --------------------------------------------
    def _told(self) -> Callable[[Replica], None]:
        """What a replica's health watch calls when its health changes (holding the fleet
        weakly: a client dropped without close() is freed, and its watches end)."""
        ref = weakref.ref(self)

        def changed(replica: Replica) -> None:
            fleet = ref()
            if fleet is not None and replica.health not in (SERVING, UNKNOWN):
                fleet.failed()
        return changed

    def _addresses(self, initial: bool = False) -> list[tuple[str, str]]:
        """Every address the target names now, with the ``dns:`` name it came from."""
        found = [(address, "") for address in self._fixed]
        for name in self._names:
            try:
                found.extend((address, name) for address in self._resolver(name))
            except (OSError, GradserveError) as err:
                if initial:
                    raise GradserveError(f"cannot resolve {name!r}: {err}") from None
                log.warning("gradserve: cannot resolve %r (%s); keeping its replicas", name, err)
                with self._lock:
                    found.extend((r.address, name) for r in self._replicas
                                 if r.address not in self._fixed)
        self._resolved_at = time.monotonic()
        return list(dict(found).items())

    def _update(self, addresses: list[tuple[str, str]]) -> None:
        """Open replicas for new addresses and retire those gone."""
        wanted = dict(addresses)
        with self._lock:
            known = {r.address: r for r in self._replicas}
            back = {r.address: r for r in self._retired if r.address in wanted}
        added = [back.get(a) or self._make(a, name) for a, name in addresses if a not in known]
        with self._lock:
            if self._stopped.is_set():   # closed meanwhile: what was made here goes too
                for replica in added:
                    if replica.address not in back:
                        replica.close()
                return
            gone = [r for r in self._replicas if r.address not in wanted]
            self._replicas = [*(known[a] for a in wanted if a in known), *added]
            self._retired = [r for r in self._retired if r.address not in back] + gone
            if added or gone:
                log.info("gradserve: replicas of %s: %s", self.target,
                         ", ".join(r.address for r in self._replicas) or "none")
            watching = self._watching
        if watching:
            for replica in added:
                replica.watch(self._told())

    def _close_idle(self) -> None:
        """Close the retired replicas nobody needs any more: no call in flight, and no live
        residual there (or it is unreachable)."""
        with self._lock:
            done = [r for r in self._retired if not r.in_flight
                    and (not r.holds_residuals or r.health == UNREACHABLE)]
            self._retired = [r for r in self._retired if r not in done]
        for replica in done:
            replica.close()

    def _tick(self) -> None:
        """Resolve again now if prompted by a failure (at most once a second), or if
        ``resolve_seconds`` passed; close retired replicas no longer needed."""
        if self._wake.is_set():
            self._wake.clear()
            wait = self._resolved_at + MIN_RESOLVE_SECONDS - time.monotonic()
            if wait > 0 and self._stopped.wait(wait):
                return
            self._update(self._addresses())
        elif time.monotonic() >= self._resolved_at + self.resolve_seconds:
            self._update(self._addresses())
        self._close_idle()


def _resolving(ref: "weakref.ref[Fleet]", stopped: threading.Event) -> None:
    """Keep a fleet's replicas current until it closes or is dropped."""
    while not stopped.is_set():
        fleet = ref()
        if fleet is None:
            return
        wake, seconds = fleet._wake, min(fleet.resolve_seconds, 1.0)
        fleet._tick()
        del fleet
        wake.wait(seconds)
