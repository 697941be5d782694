"""Prometheus metrics and the access log: one record per call, and gauges read at scrape.

``Observer.call(...)`` wraps a handler: when the call ends it counts it by
method, endpoint and status, times it, adds its tensor bytes in and out by the
transport they used, and writes one access-log line (``gradserve.access``: at
INFO, failures at WARNING so they show whatever the level; the fields also ride on
the record as ``call``, for a JSON formatter). What the server
holds (residuals, sessions, shared memory, batching) is read from the server
when Prometheus scrapes. Metrics live in a registry of the server's own, served
on their own HTTP port (``Server(metrics_port=...)``) by ``prometheus_client``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

access = logging.getLogger("gradserve.access")

#: Latency buckets (seconds): sub-millisecond small calls to minute-long ones.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
           60, 120)


@dataclass
class CallRecord:
    """What a handler tells about its call while it runs."""

    method: str
    peer: str
    principal: str = ""   # the token's name (logged)
    owner: str = field(default="", repr=False)   # whose ids the call may use (never logged)
    token: Any = field(default=None, repr=False)   # the auth token the call carries
    endpoint: str = ""
    code: str = "OK"
    bytes_in: int = 0
    bytes_out: int = 0
    transport: str = "grpc"
    extra: dict[str, Any] = field(default_factory=dict)


class Observer:
    """Counts, times and logs every call; exports the server's state at scrape time."""

    def __init__(self, state: Callable[[], Iterable[Any]] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("method", "endpoint", "code")
        self.requests = Counter("gradserve_requests", "Calls by method, endpoint and status",
                                labels, registry=self.registry)
        self.seconds = Histogram("gradserve_request_seconds", "Call duration in seconds",
                                 ("method", "endpoint"), buckets=BUCKETS, registry=self.registry)
        self.bytes = Counter("gradserve_tensor_bytes", "Tensor bytes moved, by direction and "
                             "transport", ("method", "endpoint", "direction", "transport"),
                             registry=self.registry)
        self.inflight = Gauge("gradserve_inflight_calls", "Calls being handled now",
                              ("method",), registry=self.registry)
        self.recomputes = Counter("gradserve_residual_misses", "Vjps that recomputed: their "
                                  "residual was gone", ("endpoint",), registry=self.registry)
        if state is not None:
            self.registry.register(_StateCollector(state))
        self._series: dict[tuple[Any, ...], Any] = {}
        self._http: Any = None
        self._thread: threading.Thread | None = None

    # -- serving ------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0: a free port); the port."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from None
        self._http, self._thread = server, thread
        bound: int = server.server_address[1]
        return bound

    def stop(self) -> None:
        """Stop serving metrics."""
        server, thread, self._http, self._thread = self._http, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    # -- calls --------------------------------------------------------------
    @contextlib.contextmanager
    def call(self, method: str, peer: str) -> Iterator[CallRecord]:
        """Record one call (the handler fills in what it learns) until it ends."""
        record = CallRecord(method, peer)
        gauge = self._labeled(self.inflight, method)
        gauge.inc()
        start = time.perf_counter()
        try:
            yield record
        except BaseException:
            if record.code == "OK":
                record.code = "UNKNOWN"
            raise
        finally:
            elapsed = time.perf_counter() - start
            gauge.dec()
            self._count(record, elapsed)

    def _labeled(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, found once per series (``labels`` validates each
        time; label values are bounded: methods, hosted endpoints, codes, transports)."""
        key = (metric, *values)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*values)
        return child

    def _count(self, r: CallRecord, elapsed: float) -> None:
        endpoint = r.endpoint or "-"
        self._labeled(self.requests, r.method, endpoint, r.code).inc()
        self._labeled(self.seconds, r.method, endpoint).observe(elapsed)
        if r.bytes_in:
            self._labeled(self.bytes, r.method, endpoint, "in", r.transport).inc(r.bytes_in)
        if r.bytes_out:
            self._labeled(self.bytes, r.method, endpoint, "out", r.transport).inc(r.bytes_out)
        failed = r.code != "OK"
        if not access.isEnabledFor(logging.WARNING if failed else logging.INFO):
            return
        fields = {"method": r.method, "endpoint": endpoint, "status": r.code,
                  "ms": round(elapsed * 1e3, 3), "bytes_in": r.bytes_in,
                  "bytes_out": r.bytes_out, "transport": r.transport, "peer": r.peer,
                  "token": r.principal or "-", **r.extra}
        access.log(logging.WARNING if failed else logging.INFO, "%s",
                   " ".join(f"{k}={v}" for k, v in fields.items()), extra={"call": fields})


class _StateCollector(Collector):
    """Reads what the server holds when Prometheus scrapes: ``state()`` yields metric
    families."""

    def __init__(self, state: Callable[[], Iterable[Any]]):
        self.state = state

    def collect(self) -> Iterable[Any]:
        yield from self.state()

    def describe(self) -> Iterable[Any]:
        return []


def tracing_interceptor(tracing: Any) -> Any:
    """OpenTelemetry's gRPC server interceptor: a span per call, from ``tracing`` (True: the
    global tracer provider; else the ``TracerProvider`` to use). ImportError naming the
    extra if OpenTelemetry is not installed."""
    try:
        from opentelemetry.instrumentation.grpc import server_interceptor
    except ImportError as err:
        raise ImportError("tracing needs OpenTelemetry: pip install 'gradserve[otel]'") from err
    return server_interceptor(tracer_provider=None if tracing is True else tracing)


@functools.cache
def _trace_api() -> Any:
    """OpenTelemetry's tracing API, if installed (the ``otel`` extra); else None. Found
    once: a failed import searches the path again every time it is tried."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


def trace_call(endpoint: str, residual_id: str) -> None:
    """Tag the current span (if tracing) with the endpoint and a digest of the residual id:
    a Vjp's span and its Forward's share it, and the id itself (a secret) stays out."""
    trace = _trace_api()
    if trace is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("gradserve.endpoint", endpoint)
        if residual_id:
            digest = hashlib.sha256(residual_id.encode()).hexdigest()[:16]
            span.set_attribute("gradserve.residual", digest)


def gauge(name: str, text: str, value: float, labels: dict[str, str] | None = None
          ) -> GaugeMetricFamily:
    """A gauge family of one sample."""
    family = GaugeMetricFamily(name, text, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def counter(name: str, text: str, samples: Iterable[tuple[dict[str, str], float]],
            labels: tuple[str, ...]) -> CounterMetricFamily:
    """A counter family from (labels, value) samples."""
    return _filled(CounterMetricFamily(name, text, labels=list(labels)), samples, labels)


def gauges(name: str, text: str, samples: Iterable[tuple[dict[str, str], float]],
           labels: tuple[str, ...]) -> GaugeMetricFamily:
    """A gauge family from (labels, value) samples."""
    return _filled(GaugeMetricFamily(name, text, labels=list(labels)), samples, labels)


F = TypeVar("F", CounterMetricFamily, GaugeMetricFamily)


def _filled(family: F, samples: Iterable[tuple[dict[str, str], float]],
            labels: tuple[str, ...]) -> F:
    for values, value in samples:
        family.add_metric([values[k] for k in labels], value)
    return family
