"""The endpoint registry and the interface every framework's endpoint implements."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

import grpc

from gradserve.errors import StatusError
from gradserve.frameworks import WireTensor
from gradserve.v1 import gradserve_pb2 as pb


class Endpoint(ABC):
    """A differentiable function hosted by the server.

    Subclasses (one module per framework) turn wire tensors into their arrays,
    run the function keeping what backward needs, and compute VJPs.
    """

    framework: str = ""
    name: str = ""
    debug: bool = False

    @abstractmethod
    def info(self) -> pb.EndpointInfo:
        """Static description for ListEndpoints/Describe."""

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """The endpoint's own parameters, by name (arrays of its framework)."""

    @abstractmethod
    def make_leaf(self, wire: WireTensor, path: str) -> Any:
        """An input array, on the endpoint's device, tracking grad if flagged."""

    @abstractmethod
    def forward(self, args: tuple, kwargs: dict, parameters: dict | None,
                need_vjp: bool) -> tuple[Any, Any, int]:
        """Run the function: (outputs, residual or None, residual bytes)."""

    @abstractmethod
    def vjp(self, residual: Any, cotangents: Any) -> tuple[Any, Any, Any]:
        """Gradients (args, kwargs, parameters) for the inputs flagged at forward."""


class Registry:
    """Endpoints by name; thread-safe."""

    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = threading.Lock()

    def add(self, name: str, endpoint: Endpoint) -> Endpoint:
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
        with self._lock:
            endpoint = self._endpoints.get(name)
            known = sorted(self._endpoints)
        if endpoint is None:
            raise StatusError(grpc.StatusCode.NOT_FOUND,
                              f"no endpoint named {name!r}; this server has: {', '.join(known) or 'none'}")
        return endpoint

    def all(self) -> list[Endpoint]:
        with self._lock:
            return list(self._endpoints.values())
