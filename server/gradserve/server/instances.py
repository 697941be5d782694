"""One endpoint hosted on several devices (Triton's instance groups): ``Instances``.

Each instance is an ``Endpoint`` of its own, built alike for one device. A Forward
(or a recomputing Vjp) runs on the least loaded instance; a Vjp of a kept residual
runs on the instance that made it (``Residual.instance``), where its tensors live.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

from gradserve.server.endpoint import Endpoint
from gradserve.v1 import gradserve_pb2 as pb


class Instances:
    """The instances of one endpoint name, and the load on each."""

    def __init__(self, endpoints: Sequence[Endpoint]):
        if not endpoints:
            raise ValueError("an endpoint needs at least one instance")
        self.endpoints = list(endpoints)
        for index, endpoint in enumerate(self.endpoints):
            endpoint.instance = index
        self._lock = threading.Lock()
        self._in_flight = [0] * len(self.endpoints)
        self._forwards = [0] * len(self.endpoints)
        self._vjps = [0] * len(self.endpoints)

    @property
    def primary(self) -> Endpoint:
        """The first instance: what describes the endpoint."""
        return self.endpoints[0]

    def __len__(self) -> int:
        return len(self.endpoints)

    @contextlib.contextmanager
    def running(self, kind: str, index: int | None = None) -> Iterator[Endpoint]:
        """An instance for one call of ``kind`` ("forward" or "vjp"), counted as running on
        it while the block lasts: instance ``index``, or (None) the one with the fewest
        calls running, then the fewest served."""
        with self._lock:
            if index is None:
                index = min(range(len(self.endpoints)), key=lambda i: (
                    self._in_flight[i], self._forwards[i] + self._vjps[i]))
            self._in_flight[index] += 1
            (self._forwards if kind == "forward" else self._vjps)[index] += 1
        try:
            yield self.endpoints[index]
        finally:
            with self._lock:
                self._in_flight[index] -= 1

    def info(self) -> pb.EndpointInfo:
        """The endpoint's description, naming every instance's device."""
        info = self.primary.info()
        info.devices.extend(str(e.device) for e in self.endpoints)
        return info

    def stats(self) -> list[pb.InstanceStats]:
        """Each instance's device and load."""
        with self._lock:
            return [pb.InstanceStats(index=i, device=str(e.device), in_flight=self._in_flight[i],
                                     forward_calls=self._forwards[i], vjp_calls=self._vjps[i])
                    for i, e in enumerate(self.endpoints)]
