"""``Server``: hosts endpoints on a gRPC port, with health checking and reflection."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.server.registry import Endpoint, Registry
from gradserve.server.residuals import ResidualStore
from gradserve.server.service import GradserveService, Limits
from gradserve.server.sessions import SessionManager
from gradserve.transport.bytes import DEFAULT_CHUNK_BYTES, MESSAGE_OVERHEAD
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

log = logging.getLogger("gradserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gradserve"].full_name
GiB = 1 << 30


class Server:
    """A gradserve server.

    ``port=0`` picks a free port (read it back from ``server.port``).
    ``max_residual_bytes`` and ``residual_ttl`` (seconds) bound what Forward
    keeps for Vjp; ``max_request_bytes`` bounds the tensor bytes of one
    request; ``max_message_bytes`` bounds one gRPC message (clients chunk
    larger tensors); ``chunk_bytes`` is the size of the chunks it sends;
    a request stream that sends nothing for ``idle_timeout`` seconds is
    cancelled, so stalled clients cannot pin the ``workers`` threads.
    Same-host clients get shared-memory sessions with two arenas that start
    at ``shm_arena_bytes`` and grow on demand up to ``max_shm_arena_bytes``
    each (memory is reserved as they grow), dropped when not heard from for
    ``session_lease`` seconds. Same-host clients with GPUs this server sees
    also get CUDA IPC pools of ``cuda_pool_bytes`` (a client may ask for up to
    ``max_cuda_pool_bytes``) on each such GPU.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, workers: int = 8,
                 max_residual_bytes: int = 2 * GiB, residual_ttl: float = 600.0,
                 max_request_bytes: int = 16 * GiB, max_message_bytes: int | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, idle_timeout: float = 30.0,
                 shm_arena_bytes: int = 16 << 20, max_shm_arena_bytes: int = 4 * GiB,
                 session_lease: float = 30.0, cuda_pool_bytes: int = 256 << 20,
                 max_cuda_pool_bytes: int = 4 * GiB, debug: bool = False):
        self.host = host
        self.debug = debug
        self.registry = Registry()
        self.residuals = ResidualStore(max_residual_bytes, residual_ttl)
        self.sessions = SessionManager(shm_arena_bytes, max_shm_arena_bytes, session_lease,
                                       cuda_pool_bytes, max_cuda_pool_bytes)
        self.service = GradserveService(self.registry, self.residuals, self.sessions,
                                        Limits(chunk_bytes, max_request_bytes, idle_timeout), debug)
        max_message = max_message_bytes or (4 * DEFAULT_CHUNK_BYTES + MESSAGE_OVERHEAD)
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gradserve"),
            options=[("grpc.max_receive_message_length", max_message),
                     ("grpc.max_send_message_length", -1)])
        pb_grpc.add_GradserveServicer_to_server(self.service, self._grpc)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        self.port = self._grpc.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self._started = False
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        """``host:port`` to hand to ``gradserve.connect``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- endpoints ---------------------------------------------------------
    def add(self, name: str, endpoint: Endpoint) -> Endpoint:
        """Host an endpoint built by a framework module (e.g. ``TorchEndpoint``)."""
        endpoint.debug = endpoint.debug or self.debug
        self.registry.add(name, endpoint)
        if self._started:
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return endpoint

    def add_torch(self, name: str, fn: Callable[..., Any], **options: Any) -> Endpoint:
        """Host a torch ``nn.Module`` or function; options as for ``TorchEndpoint``."""
        from gradserve.server.torch_endpoint import TorchEndpoint
        return self.add(name, TorchEndpoint(fn, **options))

    def add_jax(self, name: str, fn: Callable[..., Any], **options: Any) -> Endpoint:
        """Host a JAX function (``params=`` for ``fn(params, *args)``); options as for ``JaxEndpoint``."""
        from gradserve.server.jax_endpoint import JaxEndpoint
        return self.add(name, JaxEndpoint(fn, **options))

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "Server":
        self._grpc.start()
        self._started = True
        threading.Thread(target=self._sweep, name="gradserve-ttl", daemon=True).start()
        for name in ("", SERVICE_NAME, *(e.name for e in self.registry.all())):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gradserve listening on %s with endpoints %s", self.address,
                 ", ".join(e.name for e in self.registry.all()) or "(none)")
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` passes); True if it stopped."""
        return self._grpc.wait_for_termination(timeout)

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, free residuals."""
        self._health.enter_graceful_shutdown()
        self._grpc.stop(grace).wait()
        self._stopped.set()
        self.service.idle.stop()
        self.residuals.clear()
        self.sessions.close_all()

    def _sweep(self) -> None:
        """Drop expired residuals and sessions even while no call arrives."""
        interval = min(max(min(self.residuals.ttl, self.sessions.lease) / 4, 0.05), 30.0)
        while not self._stopped.wait(interval):
            self.residuals.sweep()
            self.sessions.sweep()

    def __enter__(self) -> "Server":
        return self.start() if not self._started else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
