"""The endpoint registry: endpoints by name."""

from __future__ import annotations

import threading

import grpc

from gradserve.errors import StatusError, shown
from gradserve.server.endpoint import Endpoint


class Registry:
    """Endpoints by name; thread-safe."""

    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = threading.Lock()

    def add(self, name: str, endpoint: Endpoint) -> Endpoint:
        """Register ``endpoint`` under ``name`` (each endpoint and name once)."""
        if not name or not isinstance(name, str):
            raise ValueError(f"endpoint name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._endpoints:
                raise ValueError(f"an endpoint named {name!r} is already registered")
            if endpoint in self._endpoints.values():
                raise ValueError(f"this endpoint is already registered as {endpoint.name!r}; "
                                 "create a second one to serve it under another name")
            endpoint.name = name
            self._endpoints[name] = endpoint
        return endpoint

    def get(self, name: str) -> Endpoint:
        """The endpoint called ``name``; NOT_FOUND listing the others."""
        with self._lock:
            endpoint = self._endpoints.get(name)
            if endpoint is not None:
                return endpoint
            known = sorted(self._endpoints)
        raise StatusError(grpc.StatusCode.NOT_FOUND,
                          f"no endpoint named {shown(name)}; this server has: "
                          f"{', '.join(known) or 'none'}")

    def has(self, name: str) -> bool:
        """Whether an endpoint is called ``name``."""
        with self._lock:
            return name in self._endpoints

    def all(self) -> list[Endpoint]:
        """Every endpoint, in registration order."""
        with self._lock:
            return list(self._endpoints.values())
