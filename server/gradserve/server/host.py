"""``Server``: hosts endpoints on a gRPC port, with health checking and reflection."""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from gradserve.security import TLSConfig
from gradserve.server.auth import AuthInterceptor, Tokens
from gradserve.server.endpoint import Endpoint, build_endpoint
from gradserve.server.health_port import HealthPort
from gradserve.server.metrics import Observer, counter, gauge, gauges, tracing_interceptor
from gradserve.server.registry import Registry
from gradserve.server.residuals import ResidualStore
from gradserve.server.service import GradserveService, Limits, OneMessageWatch
from gradserve.server.sessions import SessionManager
from gradserve.server.transports import SessionSettings
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.framing import DEFAULT_CHUNK_BYTES, MESSAGE_OVERHEAD

log = logging.getLogger("gradserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gradserve"].full_name
GiB = 1 << 30
#: Seconds ``Server.stop`` waits past its grace for gRPC to finish stopping.
STOP_SECONDS = 5.0
#: Calls beyond ``max_streams`` gRPC still admits: the unary ones (keep-alives, releases,
#: Describe, sessions) that Forward/Vjp streams must not crowd out.
CONTROL_CALLS = 16
#: Dynamic batching defaults for batchable endpoints (``Server.add`` may override them).
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_DELAY = 0.002
#: The longest ``max_delay`` an endpoint may have, in seconds.
MAX_DELAY_LIMIT = 60.0


class Server:
    """A gradserve server.

    ``port=0`` picks a free port (read it back from ``server.port``); a port
    another process (or server) listens on is refused unless ``reuse_port``
    asks to share it. ``max_residual_bytes``, ``max_residuals`` and ``residual_ttl``
    (seconds) bound what Forward keeps for Vjp (each residual is charged its tensors plus
    8 KiB; those viewing a same-host session's memory go with the session);
    ``max_request_bytes`` bounds the tensor
    bytes of one request; ``max_message_bytes`` bounds one gRPC message
    (clients chunk larger tensors); ``chunk_bytes`` is the size of the chunks
    it sends; a request stream that sends nothing for ``idle_timeout`` seconds
    or replies too slowly (under ``min_stream_rate`` bytes a second on average) is
    cancelled. At most ``workers`` forwards and backwards run at once,
    ``max_streams`` Forward/Vjp/GetParameters calls are open at once (more are
    refused with RESOURCE_EXHAUSTED; unary calls have room of their own),
    ``max_streams_per_peer`` per connection, and all requests together hold at
    most ``max_inflight_bytes`` (default: ``max_request_bytes``). ``health_port`` serves the health service alone on its own
    port (bound at ``start``) and event loop, so probes are answered whatever
    the main port is busy with.
    Same-host clients get sessions whose shared-memory regions start at
    ``shm_arena_bytes`` and grow on demand up to ``max_shm_arena_bytes`` each
    way (memory is reserved as they grow), dropped when not heard from for
    ``session_lease`` seconds. Same-host clients with GPUs this server sees
    also get CUDA IPC pools of ``cuda_pool_bytes`` (a client may ask for up to
    ``max_cuda_pool_bytes``) on each such GPU. All sessions together hold at
    most ``max_shm_total_bytes`` of shared memory and ``max_cuda_total_bytes``
    of pools per GPU; the server holds at most ``max_sessions`` sessions, one
    connection ``max_sessions_per_peer``; a session whose client has not proved
    within ``session_proof_seconds`` that it shares the host is dropped. Clients on other
    hosts may get a UCX link instead (the ``ucx`` extra, both sides): a call whose payload
    does not come over it within ``transfer_timeout`` seconds is cancelled. Batchable
    endpoints merge concurrent calls into runs of up to ``max_batch`` rows, a call
    waiting at most ``max_delay`` seconds for others (``add`` may set both per endpoint;
    ``max_batch=0`` turns merging off). ``tls`` serves the main port over TLS (mutual
    TLS where it names a client CA); ``auth`` accepts only calls carrying one of its
    tokens, each within its scopes (the health service stays open, and so does
    ``health_port``, which serves nothing else, in plaintext: kubelet probes speak no TLS).
    ``metrics_port`` serves Prometheus metrics over HTTP from ``start`` (0: a free port,
    read back from ``metrics_port``; None: none). ``tracing`` (True: OpenTelemetry's
    global tracer provider; or a ``TracerProvider``) traces every call (the ``otel``
    extra). ``max_request_values`` bounds the pytree
    nodes (tensors, scalars, containers) of one request. ``stop`` returns within its grace
    plus ``STOP_SECONDS`` whatever the clients do.

    The constructor binds the port and starts nothing; ``start`` starts the
    gRPC server and the background threads, ``stop`` stops them all.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, workers: int = 8,
                 max_streams: int = 64, max_streams_per_peer: int = 32,
                 min_stream_rate: float = 256 << 10, health_port: int | None = None,
                 max_residual_bytes: int = 2 * GiB, residual_ttl: float = 600.0,
                 max_residuals: int = 100_000,
                 max_request_bytes: int = 16 * GiB, max_message_bytes: int | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, idle_timeout: float = 30.0,
                 shm_arena_bytes: int = 16 << 20, max_shm_arena_bytes: int = 2 * GiB,
                 session_lease: float = 30.0, max_shm_total_bytes: int = 8 * GiB,
                 cuda_pool_bytes: int = 256 << 20, max_cuda_pool_bytes: int = 4 * GiB,
                 max_cuda_total_bytes: int = 8 * GiB, max_sessions: int = 256,
                 max_sessions_per_peer: int = 16, session_proof_seconds: float = 10.0,
                 transfer_timeout: float = 30.0, max_inflight_bytes: int | None = None,
                 max_request_values: int = 10_000, max_batch: int = DEFAULT_MAX_BATCH,
                 max_delay: float = DEFAULT_MAX_DELAY, tls: TLSConfig | None = None,
                 auth: Tokens | None = None, metrics_port: int | None = None,
                 tracing: Any = None, reuse_port: bool = False, debug: bool = False):
        check_settings(
            ports=dict(port=port, health_port=health_port, metrics_port=metrics_port),
            counts=dict(workers=workers, max_streams=max_streams,
                        max_streams_per_peer=max_streams_per_peer, chunk_bytes=chunk_bytes,
                        max_message_bytes=max_message_bytes,
                        max_request_values=max_request_values),
            sizes=dict(min_stream_rate=min_stream_rate, residual_ttl=residual_ttl,
                       max_residual_bytes=max_residual_bytes,
                       max_residuals=max_residuals, max_request_bytes=max_request_bytes,
                       max_inflight_bytes=max_inflight_bytes, shm_arena_bytes=shm_arena_bytes,
                       max_shm_arena_bytes=max_shm_arena_bytes,
                       max_shm_total_bytes=max_shm_total_bytes, cuda_pool_bytes=cuda_pool_bytes,
                       max_cuda_pool_bytes=max_cuda_pool_bytes,
                       max_cuda_total_bytes=max_cuda_total_bytes, max_sessions=max_sessions,
                       max_sessions_per_peer=max_sessions_per_peer),
            seconds=dict(idle_timeout=idle_timeout,
                         session_lease=session_lease,
                         session_proof_seconds=session_proof_seconds,
                         transfer_timeout=transfer_timeout))
        check_batching(max_batch, max_delay)
        self.host = host
        self.debug = debug
        #: dynamic batching defaults of batchable endpoints (``add`` may override them)
        self.max_batch, self.max_delay = max_batch, max_delay
        self.registry = Registry()
        self.residuals = ResidualStore(max_residual_bytes, residual_ttl, max_count=max_residuals)
        self.sessions = SessionManager(SessionSettings(
            shm_arena_bytes=shm_arena_bytes, max_shm_arena_bytes=max_shm_arena_bytes,
            cuda_pool_bytes=cuda_pool_bytes, max_cuda_pool_bytes=max_cuda_pool_bytes,
            session_lease=session_lease, max_shm_total_bytes=max_shm_total_bytes,
            max_cuda_total_bytes=max_cuda_total_bytes, max_sessions=max_sessions,
            max_sessions_per_peer=max_sessions_per_peer,
            session_proof_seconds=session_proof_seconds, transfer_timeout=transfer_timeout,
            owner=secrets.token_hex(8)),
            on_close=self.residuals.release_session)
        self.service = GradserveService(self.registry, self.residuals, self.sessions, Limits(
            chunk_bytes=chunk_bytes, max_request_bytes=max_request_bytes,
            idle_timeout=idle_timeout, max_request_values=max_request_values, workers=workers,
            max_streams=max_streams, max_streams_per_peer=max_streams_per_peer,
            min_stream_rate=min_stream_rate,
            max_inflight_bytes=(max_request_bytes if max_inflight_bytes is None
                                else max_inflight_bytes)), debug, auth,
            Observer(self._state))
        self._metrics_asked = metrics_port
        #: the port ``/metrics`` is served on once started (None: not served)
        self.metrics_port: int | None = None
        self.tls, self.auth = tls, auth
        credentials = tls.server_credentials() if tls is not None else None
        max_message = max_message_bytes or (4 * DEFAULT_CHUNK_BYTES + MESSAGE_OVERHEAD)
        # a thread per open call (a call reading its request or draining its reply holds
        # one); the model runs in at most `workers` of them at once
        self._executor = futures.ThreadPoolExecutor(
            max_workers=max_streams + CONTROL_CALLS + 2, thread_name_prefix="gradserve")
        # outermost: a one-message request is read under the stream watch, whatever comes
        interceptors: list[grpc.ServerInterceptor] = [OneMessageWatch(self.service.watch)]
        if tracing:   # refused calls are traced too
            interceptors.append(tracing_interceptor(tracing))
        if auth is not None:
            interceptors.append(AuthInterceptor(auth, self.service.observer))
        self._grpc = grpc.server(self._executor, interceptors=interceptors,
                                 maximum_concurrent_rpcs=max_streams + CONTROL_CALLS, options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if reuse_port else 0)])
        pb_grpc.add_GradserveServicer_to_server(self.service, self._grpc)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        _serve_reflection(self._grpc, (SERVICE_NAME, health.SERVICE_NAME))
        self.port = _bind(self._grpc, host, port, credentials)
        self._health_port = (HealthPort(host, health_port, reuse_port)
                             if health_port is not None else None)
        self._started = False
        self._stopped = threading.Event()
        self._sweeper: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port`` to hand to ``gradserve.connect``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- endpoints ---------------------------------------------------------
    def add(self, name: str, endpoint: Any, *, framework: str | None = None,
            devices: Sequence[Any] | None = None, max_batch: int | None = None,
            max_delay: float | None = None, **options: Any) -> Endpoint:
        """Host ``endpoint`` under ``name``: an ``Endpoint``, a list of them (one instance
        each, e.g. one per device), or a model or function that ``framework`` (default: the
        one that claims it) serves with ``options``, once on each of ``devices`` if given
        (``["cuda:0", "cuda:1"]``; ``["cpu", "cpu"]``: two instances on the CPU). A call
        runs on the least loaded instance, a Vjp on the one holding its residual. A
        batchable endpoint merges concurrent calls up to ``max_batch`` rows, a call waiting
        at most ``max_delay`` seconds for others (default: the server's; ``max_batch=0``:
        never). Returns the first instance."""
        if isinstance(devices, str):
            raise TypeError(f"devices= is a list of devices, e.g. {devices.split(',')!r}; "
                            f"got the string {devices!r}")
        if devices is not None:
            if isinstance(endpoint, Endpoint) or isinstance(endpoint, (list, tuple)):
                raise TypeError("devices= builds one instance per device from a model or "
                                "function; an Endpoint has its device (pass a list of them)")
            devices = list(devices)
            if not devices:
                raise ValueError("devices= names no device")
            if "device" in options:
                raise TypeError("give devices= or device=, not both")
            served = [build_endpoint(endpoint, framework_name=framework, device=device,
                                     **options) for device in devices]
        elif isinstance(endpoint, (list, tuple)):
            served = [build_endpoint(e, framework_name=framework, **options) for e in endpoint]
        else:
            served = [build_endpoint(endpoint, framework_name=framework, **options)]
        max_batch = self.max_batch if max_batch is None else max_batch
        max_delay = self.max_delay if max_delay is None else max_delay
        check_batching(max_batch, max_delay)
        for instance in served:
            if instance.batchable:
                instance.max_batch, instance.max_delay = max_batch, max_delay
            instance.debug = instance.debug or self.debug
        first = self.registry.add(name, served)
        if self._started:
            self._serving(name)
        return first

    def add_torch(self, name: str, fn: Callable[..., Any], **options: Any) -> Endpoint:
        """Host a torch ``nn.Module`` or function (``devices=``: once per device); options as
        for ``TorchEndpoint``."""
        return self.add(name, fn, framework="torch", **options)

    def add_jax(self, name: str, fn: Callable[..., Any], **options: Any) -> Endpoint:
        """Host a JAX function (``params=`` for ``fn(params, *args)``; ``devices=``: once per
        device); options as for ``JaxEndpoint``."""
        return self.add(name, fn, framework="jax", **options)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "Server":
        """Start serving, and the threads that free memory and end stalled streams (memory
        that servers which died left behind is cleaned up first). If any of it fails, what
        did start is stopped again."""
        try:
            self.sessions.start()
            if self._health_port is not None:
                self._health_port.start(_bind)
            self._grpc.start()
            self._started = True
            if self._metrics_asked is not None:
                self.metrics_port = self.service.observer.start(self.host, self._metrics_asked)
            self.residuals.dropper.start()
            self.service.watch.start()
            self._sweeper = threading.Thread(target=self._sweep, name="gradserve-ttl",
                                             daemon=True)
            self._sweeper.start()
        except BaseException:
            self.stop(grace=0)
            raise
        for name in ("", SERVICE_NAME, *(e.name for e in self.registry.all())):
            self._serving(name)
        log.info("gradserve listening on %s with endpoints %s", self.address,
                 ", ".join(e.name for e in self.registry.all()) or "(none)")
        return self

    @property
    def health_port(self) -> int | None:
        """The health service's own port, once started (None: only the main port)."""
        return self._health_port.port if self._health_port is not None else None

    def _serving(self, name: str) -> None:
        self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._health_port is not None:
            self._health_port.set(name, health_pb2.HealthCheckResponse.SERVING)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` passes); True if it stopped."""
        stopped: bool = self._grpc.wait_for_termination(timeout)
        return stopped

    def drain(self, grace: float, interrupted: threading.Event | None = None) -> bool:
        """Shut down gently (a replica leaving a fleet): health says NOT_SERVING at once,
        new Forwards are refused (UNAVAILABLE, reason ``draining``: clients go to another
        replica) and Vjps of residuals held here are answered, until none is held and no
        call is open, ``grace`` seconds pass or ``interrupted`` is set. True if it emptied.
        ``stop`` ends the server afterwards."""
        self.service.drain()
        self._health.enter_graceful_shutdown()
        if self._health_port is not None:
            for name in ("", SERVICE_NAME, *(e.name for e in self.registry.all())):
                self._health_port.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        until = time.monotonic() + grace
        wake = interrupted if interrupted is not None else threading.Event()
        while True:
            if not self.residuals.stats().count and not self.service.active_streams():
                return True
            left = until - time.monotonic()
            if left <= 0 or wake.wait(min(left, 0.05)):
                return False

    @property
    def draining(self) -> bool:
        """Whether ``drain`` was called (new Forwards are refused)."""
        return self.service.draining

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, free
        residuals and sessions, and end every thread ``start`` started."""
        self._health.enter_graceful_shutdown()
        if self._health_port is not None:   # probes now fail: this replica is going
            self._health_port.stop(STOP_SECONDS)
        if not self._grpc.stop(grace).wait((grace or 0.0) + STOP_SECONDS):
            log.warning("gradserve: calls still running %.1f s after the grace; stopping anyway",
                        STOP_SECONDS)
        self._stopped.set()
        if self._sweeper is not None:
            self._sweeper.join()
            self._sweeper = None
        self.service.watch.stop()
        self.service.observer.stop()
        self.metrics_port = None
        self.residuals.dropper.stop()
        self._executor.shutdown(wait=False)   # idle workers end now, busy ones when done
        self.residuals.clear()
        self.sessions.stop()

    def _sweep(self) -> None:
        """Drop expired residuals and sessions even while no call arrives."""
        settings = self.sessions.settings
        interval = min(max(min(self.residuals.ttl, settings.session_lease,
                               settings.session_proof_seconds) / 4, 0.05), 30.0)
        while not self._stopped.wait(interval):
            self.residuals.sweep()
            self.sessions.sweep()

    def _state(self) -> Iterator[Any]:
        """What the server holds, as Prometheus metric families (read at each scrape)."""
        stats = self.residuals.stats()
        yield gauge("gradserve_residuals", "Residuals held", stats.count)
        yield gauge("gradserve_residual_bytes", "Bytes residuals are charged", stats.bytes)
        yield counter("gradserve_residual_evictions", "Residuals evicted (LRU) or expired",
                      [({}, stats.evictions)], ())
        yield gauge("gradserve_sessions", "Same-host sessions held", self.sessions.count())
        yield gauge("gradserve_shared_memory_bytes", "Shared memory all sessions hold",
                    self.sessions.budget.used(pb.SHARED_MEMORY))
        yield gauge("gradserve_streams_open", "Streaming and one-message Forward/Vjp calls "
                    "open", self.service.active_streams())
        groups = self.registry.groups()
        where = ("endpoint", "instance", "device")
        yield gauges("gradserve_instance_in_flight", "Forward/Vjp calls running on each "
                    "instance (device) of an endpoint",
                    [({"endpoint": g.primary.name, "instance": str(i.index),
                       "device": i.device}, i.in_flight) for g in groups for i in g.stats()],
                    where)
        yield counter("gradserve_instance_calls", "Calls each instance (device) of an "
                      "endpoint ran",
                      [({"endpoint": g.primary.name, "instance": str(i.index),
                         "device": i.device, "kind": kind}, n)
                       for g in groups for i in g.stats()
                       for kind, n in (("forward", i.forward_calls), ("vjp", i.vjp_calls))],
                      (*where, "kind"))
        batches = list(self.service.batch_stats().items())
        labels = ("endpoint", "kind")
        yield counter("gradserve_batch_runs", "Model runs of merged calls",
                      [({"endpoint": n, "kind": "forward"}, b.forward_runs) for n, b in batches]
                      + [({"endpoint": n, "kind": "vjp"}, b.vjp_runs) for n, b in batches],
                      labels)
        yield counter("gradserve_batch_calls", "Calls merged runs served (calls / runs: the "
                      "mean batch)",
                      [({"endpoint": n, "kind": "forward"}, b.forward_calls) for n, b in batches]
                      + [({"endpoint": n, "kind": "vjp"}, b.vjp_calls) for n, b in batches],
                      labels)
        yield counter("gradserve_batch_rows", "Rows merged forward runs took",
                      [({"endpoint": n}, b.forward_rows) for n, b in batches], ("endpoint",))
        yield counter("gradserve_batch_queue_seconds", "Seconds calls waited for their merged "
                      "run", [({"endpoint": n}, b.queue_seconds) for n, b in batches],
                      ("endpoint",))

    def __enter__(self) -> "Server":
        return self.start() if not self._started else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


#: The reflection service's current name; grpcio-reflection serves only v1alpha's.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _serve_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Serve reflection as ``grpc.reflection.v1`` and ``v1alpha``: one servicer, since the
    two protocols' messages are the same on the wire (v1 renamed only the package)."""
    servicer = reflection.ReflectionServicer(
        (*services, reflection.SERVICE_NAME, REFLECTION_V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def check_settings(ports: dict[str, int | None], counts: dict[str, int | None],
                   sizes: dict[str, float | None], seconds: dict[str, float]) -> None:
    """ValueError naming the first setting out of its range (None: unset, allowed): ports
    0 to 65535, counts at least 1, sizes at least 0, seconds positive and finite."""
    kinds: tuple[tuple[dict[str, Any], Callable[[float], bool], str], ...] = (
        (ports, lambda v: 0 <= v <= 65535, "a port, 0 to 65535 (0: a free one)"),
        (counts, lambda v: v >= 1, "at least 1"),
        (sizes, lambda v: v >= 0, "at least 0"),
        (seconds, lambda v: 0 < v < math.inf, "a positive, finite number of seconds"))
    for values, fits, wanted in kinds:   # a NaN fits none of them
        for name, value in values.items():
            if value is not None and not fits(value):
                raise ValueError(f"{name} must be {wanted}, got {value}")


def check_batching(max_batch: int, max_delay: float) -> None:
    """ValueError unless ``max_batch`` is at least 0 and ``max_delay`` 0 to
    ``MAX_DELAY_LIMIT`` seconds."""
    if not max_batch >= 0:
        raise ValueError(f"max_batch must be at least 0, got {max_batch}")
    if not 0 <= max_delay <= MAX_DELAY_LIMIT:   # NaN too
        raise ValueError(f"max_delay must be 0 to {MAX_DELAY_LIMIT:g} seconds, got {max_delay}")


def _bind(server: grpc.Server, host: str, port: int,
          credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on ``host:port`` (with TLS where ``credentials`` are given); OSError naming
    the address if it cannot be had."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as err:
        bound, detail = 0, f" ({err})"
    else:
        detail = ""
    if not bound:
        raise OSError(f"cannot listen on {address}: the port is in use (another server?) or "
                      f"the address is not this machine's{detail}; pass reuse_port=True to "
                      "share a port on purpose")
    return int(bound)
