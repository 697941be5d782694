"""What a server tells its operators: Prometheus metrics, access logs, errors in its log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch

import gradserve
from gradserve.server import Server
from helpers import scrape, series


def raises(x: torch.Tensor) -> torch.Tensor:
    raise ValueError("model failure for the log")


@pytest.fixture
def server() -> Server:
    server = Server("127.0.0.1", 0, metrics_port=0)
    server.add_torch("double", lambda x: x * 2, batchable=True)
    server.add_torch("raises", raises)
    server.start()
    yield server
    server.stop(grace=0)


def test_metrics_count_time_and_size_calls_and_show_what_the_server_holds(server) -> None:
    assert server.metrics_port
    with gradserve.connect(server.address, transport="grpc") as client:
        x = np.ones((4, 3), np.float32)
        result = client.forward("double", (x,), need_vjp=True)
        with pytest.raises(gradserve.InvalidArgument):
            client.forward("double", ())
        server.residuals.release([result.residual.id])          # evicted, say
        client.vjp(result.residual, np.ones((4, 3), np.float32))  # recomputes
        found = scrape(server.metrics_port)
        ok = series("gradserve_requests_total", code="OK", endpoint="double",
                    method="ForwardUnary")
        assert found[ok] == 1
        assert found[series("gradserve_requests_total", code="INVALID_ARGUMENT",
                            endpoint="double", method="ForwardUnary")] == 1
        assert found[series("gradserve_request_seconds_count", endpoint="double",
                            method="ForwardUnary")] == 2
        assert found[series("gradserve_tensor_bytes_total", direction="in", endpoint="double",
                            method="ForwardUnary", transport="grpc")] == 48
        assert found[series("gradserve_tensor_bytes_total", direction="out", endpoint="double",
                            method="ForwardUnary", transport="grpc")] == 48
        assert found[series("gradserve_residual_misses_total", endpoint="double")] == 1
        assert found[series("gradserve_batch_runs_total", endpoint="double", kind="forward")] == 1
        assert found["gradserve_residuals"] == 0
        kept = client.forward("double", (x,), need_vjp=True)   # a residual kept, a run more
        with pytest.raises(gradserve.NotFound):
            client.describe("made-up-" + "x" * 10_000)
        again = scrape(server.metrics_port)
        # names no endpoint has are one label value: made-up ones cannot grow the series
        assert again[series("gradserve_requests_total", code="NOT_FOUND", endpoint="?",
                            method="Describe")] == 1
        assert again[ok] == 2
        assert again["gradserve_residuals"] == 1
        assert again["gradserve_residual_bytes"] > 0
        assert again[series("gradserve_batch_runs_total", endpoint="double", kind="forward")] == 2
        assert again[series("gradserve_inflight_calls", method="ForwardUnary")] == 0
        assert kept.residual is not None


def test_every_call_is_logged_once_and_failures_with_their_reason(server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gradserve")
    with gradserve.connect(server.address, transport="grpc") as client:
        client.forward("double", (np.ones(2, np.float32),))
        with pytest.raises(gradserve.Internal) as info:
            client.forward("raises", (np.ones(2, np.float32),))
        result = client.forward("double", (np.ones(2, np.float32),), need_vjp=True)
        rid = result.residual.id
        server.residuals.release([rid])
        client.vjp(result.residual, np.ones(2, np.float32))   # refused, then recomputed
    assert "Traceback" not in str(info.value)           # the client gets no traceback...
    access = [r for r in caplog.records if r.name == "gradserve.access"]
    forwards = [r for r in access if r.call["method"] == "ForwardUnary"]
    assert [(r.call["endpoint"], r.call["status"], r.levelname) for r in forwards] == [
        ("double", "OK", "INFO"), ("raises", "INTERNAL", "WARNING"), ("double", "OK", "INFO")]
    missed = [r for r in access if r.call["method"] == "VjpUnary"][0]
    assert missed.call["error"] == "residual-missing"           # the reason, not the id
    assert rid and rid not in caplog.text
    assert forwards[0].getMessage().startswith("method=ForwardUnary endpoint=double status=OK ms=")
    assert forwards[0].call["bytes_in"] == 8 and forwards[0].call["transport"] == "grpc"
    assert "model failure for the log" in forwards[1].call["error"]
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "raises" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None   # ...the server's log does


def test_json_log_lines_carry_the_call_fields() -> None:
    from gradserve.server.cli import JsonFormatter
    record = logging.LogRecord("gradserve.access", logging.INFO, __file__, 1, "%s",
                               ("method=Describe",), None)
    record.call = {"method": "Describe", "status": "OK", "ms": 0.5}
    line = json.loads(JsonFormatter().format(record))
    assert (line["logger"], line["level"], line["message"], line["method"], line["ms"]) == (
        "gradserve.access", "INFO", "method=Describe", "Describe", 0.5)


def test_stop_closes_the_metrics_port() -> None:
    server = Server("127.0.0.1", 0, metrics_port=0).start()
    port = server.metrics_port
    assert port and "gradserve_sessions 0.0" in urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    server.stop(grace=0)
    assert server.metrics_port is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_errors_carry_the_standard_rich_status(server) -> None:
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from gradserve.v1 import gradserve_pb2 as pb
    from helpers import raw

    def failure(request: pb.ForwardRequest | pb.VjpRequest, method: str) -> tuple[Any, ...]:
        with pytest.raises(grpc.RpcError) as info:
            getattr(raw(server), method)(request, timeout=10)
        status = rpc_status.from_call(info.value)
        assert status is not None and status.code == info.value.code().value[0]
        found = {}
        for detail in status.details:
            for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
                if detail.Is(kind.DESCRIPTOR):
                    found[kind.__name__] = kind()
                    detail.Unpack(found[kind.__name__])
        return info.value, found

    bad = pb.ForwardRequest(endpoint="double", args=pb.Value(tuple_value=pb.Sequence(items=[
        pb.Value(tensor=pb.Tensor(dtype=pb.INT64, shape=[2], data=bytes(16),
                                  requires_grad=True))])))
    err, details = failure(bad, "ForwardUnary")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (details["ErrorInfo"].reason, details["ErrorInfo"].domain) == (
        "INVALID_ARGUMENT", "gradserve.v1")
    violation = details["BadRequest"].field_violations[0]
    assert violation.field == "args[0]"
    assert violation.description.startswith("requires_grad on a int64 tensor")
    err, details = failure(pb.VjpRequest(endpoint="double", residual_id="gone"), "VjpUnary")
    assert details["ErrorInfo"].reason == "RESIDUAL_MISSING" and "BadRequest" not in details
    assert ("gradserve-reason", "residual-missing") in err.trailing_metadata()


def test_tracing_spans_each_call_and_links_a_vjp_to_its_forward() -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = Server("127.0.0.1", 0, tracing=provider)
    server.add_torch("double", lambda x: x * 2)
    server.start()
    try:
        with gradserve.connect(server.address, transport="grpc") as client:
            result = client.forward("double", (np.ones(3, np.float32),), need_vjp=True)
            rid = result.residual.id                  # close() releases it, and forgets it
            client.vjp(result.residual, np.ones(3, np.float32))
            streamed = np.ones(1 << 19, np.float32)   # 2 MiB: over a chunk, it streams
            client.forward("double", (streamed,))
    finally:
        server.stop(grace=0)
    spans = {s.name.rsplit("/", 1)[-1]: s for s in exporter.get_finished_spans()}
    forward, vjp = spans["ForwardUnary"], spans["VjpUnary"]
    assert forward.attributes["gradserve.endpoint"] == "double"
    assert forward.attributes["gradserve.residual"] == vjp.attributes["gradserve.residual"]
    assert rid and rid not in str(forward.attributes)          # a digest, not the secret id
    assert "Forward" in spans                                    # streaming calls too


def test_a_server_without_the_otel_extra_looks_for_it_once() -> None:
    """Tagging spans must not retry a failed import of OpenTelemetry on every call (each
    try searches the whole path again)."""
    script = textwrap.dedent("""
        import sys
        tries = []

        class Missing:   # as if the otel extra were not installed; counts the searches
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "opentelemetry":
                    tries.append(name)
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, Missing())
        import numpy as np
        import gradserve
        from gradserve.server import Server

        server = Server("127.0.0.1", 0)
        server.add_torch("double", lambda x: x * 2)
        server.start()
        with gradserve.connect(server.address, transport="grpc") as client:
            for _ in range(5):
                result = client.forward("double", (np.ones(3, np.float32),), need_vjp=True)
                grads = client.vjp(result.residual, np.ones(3, np.float32))
                assert grads.args[0].tolist() == [2.0, 2.0, 2.0]
        server.stop(grace=0)
        print(len(tries))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"   # 10 calls, one search


def test_a_model_fake_tensors_cannot_trace_logs_one_debug_line(caplog) -> None:
    def data_dependent(x: torch.Tensor) -> torch.Tensor:
        return x * float(x.sum().item() > 0)      # .item() has no fake value

    server = Server("127.0.0.1", 0)
    server.add_torch("dd", data_dependent)
    server.start()
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="gradserve")   # whatever a CLI test left it at
    try:
        with gradserve.connect(server.address, transport="grpc") as client:
            types = client.signature("dd", (gradserve.TensorType((3,), "float32"),))
        assert types == gradserve.TensorType((3,), "float32")    # from the dry run on zeros
    finally:
        server.stop(grace=0)
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert noisy == []
    said = [r for r in caplog.records if "cannot be traced with fake tensors" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "DEBUG" and said[0].exc_info is None
