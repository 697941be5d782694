"""The endpoint registry: endpoints by name, each with its instances (one per device)."""

from __future__ import annotations

import threading
from typing import Sequence

import grpc

from gradserve.errors import StatusError, shown
from gradserve.server.endpoint import Endpoint
from gradserve.server.instances import Instances


class Registry:
    """Endpoints by name; thread-safe."""

    def __init__(self) -> None:
        self._groups: dict[str, Instances] = {}
        self._lock = threading.Lock()

    def add(self, name: str, endpoint: Endpoint | Sequence[Endpoint]) -> Endpoint:
        """Register ``endpoint`` under ``name`` (a list: one instance per device); each
        endpoint and name once. Returns the first instance."""
        if not name or not isinstance(name, str):
            raise ValueError(f"endpoint name must be a non-empty string, got {name!r}")
        endpoints = [endpoint] if isinstance(endpoint, Endpoint) else list(endpoint)
        with self._lock:
            if name in self._groups:
                raise ValueError(f"an endpoint named {name!r} is already registered")
            taken = {id(e): e.name for g in self._groups.values() for e in g.endpoints}
            for index, instance in enumerate(endpoints):
                if id(instance) in taken or any(instance is other
                                                for other in endpoints[:index]):
                    raise ValueError(f"this endpoint is already registered as "
                                     f"{taken.get(id(instance), name)!r}; create another to "
                                     "serve it again")
            group = Instances(endpoints)   # numbers its instances: only once they are checked
            for instance in group.endpoints:
                instance.name = name
            self._groups[name] = group
        return group.primary

    def get(self, name: str) -> Endpoint:
        """The endpoint called ``name`` (its first instance); NOT_FOUND listing the others."""
        return self.instances(name).primary

    def instances(self, name: str) -> Instances:
        """The instances of the endpoint called ``name``; NOT_FOUND listing the others."""
        with self._lock:
            group = self._groups.get(name)
            if group is not None:
                return group
            known = sorted(self._groups)
        raise StatusError(grpc.StatusCode.NOT_FOUND,
                          f"no endpoint named {shown(name)}; this server has: "
                          f"{', '.join(known) or 'none'}")

    def has(self, name: str) -> bool:
        """Whether an endpoint is called ``name``."""
        with self._lock:
            return name in self._groups

    def all(self) -> list[Endpoint]:
        """Every endpoint (its first instance), in registration order."""
        with self._lock:
            return [g.primary for g in self._groups.values()]

    def groups(self) -> list[Instances]:
        """Every endpoint's instances, in registration order."""
        with self._lock:
            return list(self._groups.values())
