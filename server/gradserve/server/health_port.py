"""The health service alone, on a port of its own, for orchestrators' probes.

It runs on an ``asyncio`` gRPC server in a thread of its own: a call there
holds no thread while it waits, so neither the calls on the main port nor
clients that open checks and never finish them can keep a probe from being
answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2_grpc


class HealthPort:
    """``grpc.health.v1.Health`` on ``host:port`` (0: a free port, read back from ``port``)."""

    def __init__(self, host: str, port: int, reuse_port: bool = False):
        self._host, self._asked, self._reuse = host, port, reuse_port
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._health: health_async.HealthServicer | None = None

    def start(self, bind: Any) -> None:
        """Start the loop thread and serve; ``bind(server, host, port)`` listens (raising
        OSError when it cannot)."""
        loop = asyncio.new_event_loop()
        ready: list[BaseException | None] = []
        started = threading.Event()

        async def serve() -> None:
            self._health = health_async.HealthServicer()
            server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if self._reuse else 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            self.port = bind(server, self._host, self._asked)
            await server.start()
            self._server = server

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve())
                ready.append(None)
            except BaseException as err:   # surfaced in start()
                ready.append(err)
            started.set()
            if ready[0] is None:
                loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="gradserve-health", daemon=True)
        self._thread.start()
        started.wait()
        if ready[0] is not None:
            self._thread.join()
            self._thread = None
            raise ready[0]

    def set(self, service: str, status: Any) -> None:
        """Report ``service``'s serving status."""
        self._call(lambda health: health.set(service, status))

    def stop(self, timeout: float) -> None:
        """Stop serving and end the thread (within about ``timeout`` seconds)."""
        loop, thread, server = self._loop, self._thread, self._server
        self._thread = None
        if loop is None or thread is None:
            return
        if server is not None:
            try:
                asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout)
            except concurrent.futures.TimeoutError:
                pass   # the loop stops below all the same
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def _call(self, make: Any) -> None:
        if self._loop is not None and self._health is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(make(self._health), self._loop).result(5.0)
