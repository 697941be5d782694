"""`gradserve serve` / `gradserve list`, health checking and reflection."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import gradserve
from gradserve.server.cli import build_endpoints, load_target
from helpers import TARGETS, free_port, serve_process, wait_serving, wait_until

HERE = Path(__file__).resolve().parent


def test_module_function_dict_and_factory_targets() -> None:
    name, obj = load_target(f"{TARGETS}:model")
    assert name == "model" and set(build_endpoints(name, obj, None)) == {"model"}
    name, obj = load_target(f"{TARGETS}:table")
    assert set(build_endpoints(name, obj, None)) == {"lin", "square"}
    name, obj = load_target(f"{TARGETS}:factory")
    eps = build_endpoints(name, obj, "cpu")
    assert set(eps) == {"sq"} and eps["sq"].input_specs["x"].dtype == "float32"
    name, obj = load_target("gradserve.server.models.digits:endpoints")
    assert "digits" in build_endpoints(name, obj, None)


@pytest.mark.parametrize("target, message", [
    ("no-colon", "must look like module:attr"),
    (f"{HERE}/missing.py:x", "no such file"),
    (f"{TARGETS}:missing", "has no attribute 'missing'"),
    ("no_such_package.models:x", "no module named 'no_such_package'"),
])
def test_bad_targets_exit_with_a_message(target, message) -> None:
    with pytest.raises(SystemExit, match=message):
        load_target(target)


def test_non_servable_object_is_refused() -> None:
    name, obj = load_target(f"{TARGETS}:not_servable")
    with pytest.raises(SystemExit, match="'not_servable' is a int"):
        build_endpoints(name, obj, None)


def test_serve_list_health_reflection_and_sigterm() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = serve_process("table", port, "--workers", "2")
    try:
        channel = wait_serving(address)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("gradserve.v1.Gradserve", "lin", "square"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = {s.name for r in replies for s in r.list_services_response.service}
        assert {"gradserve.v1.Gradserve", "grpc.health.v1.Health"} <= services
        v1 = channel.stream_stream(   # the current protocol: v1alpha's messages, renamed
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        replies = v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        assert {"gradserve.v1.Gradserve", "grpc.reflection.v1.ServerReflection"} <= {
            s.name for r in replies for s in r.list_services_response.service}

        listing = subprocess.run([sys.executable, "-m", "gradserve.server.cli", "list", address],
                                 capture_output=True, text=True, timeout=60)
        closed = subprocess.run(   # stdout a pipe whose reader is gone, as `| head -1` leaves it
            [sys.executable, "-c", "import os, sys; r, w = os.pipe(); os.close(r); "
             "os.dup2(w, 1); from gradserve.server.cli import main; "
             f"sys.exit(main(['list', '{address}']))"],
            capture_output=True, text=True, timeout=60)
        assert (closed.returncode, closed.stderr) == (0, "")
        assert listing.returncode == 0, listing.stderr
        assert "lin(input: torch.Tensor) -> torch.Tensor  [torch on cpu]" in listing.stdout
        assert "square(x)  [torch on cpu]" in listing.stdout
        assert "Elementwise square." in listing.stdout
        assert "parameters: 2 tensors, 8 values (client may send its own)" in listing.stdout

        with gradserve.connect(address) as client:
            assert not client.describe("square").same_process
            x = torch.randn(4, requires_grad=True)
            client.torch("square")(x).sum().backward()
            torch.testing.assert_close(x.grad, 2 * x.detach())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"serving lin, square on {address}" in out


def test_list_against_no_server_fails_cleanly() -> None:
    result = subprocess.run([sys.executable, "-m", "gradserve.server.cli", "list",
                             f"127.0.0.1:{free_port()}", "--timeout", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("gradserve: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("keyword, value, message", [
    ("workers", 0, "workers must be at least 1, got 0"),
    ("max_residual_bytes", -1, "max_residual_bytes must be at least 0, got -1"),
    ("idle_timeout", float("nan"), "idle_timeout must be a positive, finite number of seconds, "
                                   "got nan"),
    ("health_port", 70000, "health_port must be a port, 0 to 65535 (0: a free one), got 70000"),
    ("max_batch", -1, "max_batch must be at least 0, got -1"),
    ("max_delay", float("inf"), "max_delay must be 0 to 60 seconds, got inf"),
])
def test_server_settings_out_of_range_are_refused_naming_the_keyword(keyword, value, message
                                                                     ) -> None:
    from gradserve.server import Server
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Server("127.0.0.1", 0, **{keyword: value})


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "gradserve: workers must be at least 1, got 0"),
    (["--device", "nonsense"], "gradserve: cannot serve '"),
    (["--metrics-port", "{taken}"], "gradserve: cannot serve metrics on 127.0.0.1:{taken}: "),
    (["--health-port", "{taken}"], "gradserve: cannot listen on 127.0.0.1:{taken}: the port "
                                   "is in use"),
])
def test_serve_settings_that_cannot_work_are_one_line_and_exit_1(flags, message) -> None:
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        flags = [f.replace("{taken}", port) for f in flags]
        result = subprocess.run([sys.executable, "-m", "gradserve.server.cli", "serve",
                                 f"{TARGETS}:model", "--port", "0", *flags],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]   # grpc may log a line of its own first
    assert last.startswith(message.replace("{taken}", port)), result.stderr
    assert "Traceback" not in result.stderr


def test_ports_out_of_range_are_argument_errors(capsys) -> None:
    from gradserve.server.cli import main
    for flag in ("--port", "--health-port", "--metrics-port"):
        with pytest.raises(SystemExit) as exit:
            main(["serve", f"{TARGETS}:model", flag, "99999"])
        assert exit.value.code == 2
        assert "a port is 0 to 65535 (0: a free one), got '99999'" in capsys.readouterr().err


def test_every_limit_is_a_flag_with_the_servers_default() -> None:
    import inspect

    from gradserve.server import Server
    from gradserve.server.cli import SERVER_OPTIONS, parser

    args = parser().parse_args(["serve", "m:x", "--max-sessions", "3", "--max-shm-total-bytes",
                                "1GiB", "--session-proof-seconds", "0.5", "--reuse-port"])
    assert (args.max_sessions, args.max_shm_total_bytes, args.session_proof_seconds,
            args.reuse_port) == (3, 1 << 30, 0.5, True)
    defaults = parser().parse_args(["serve", "m:x"])
    keywords = {name: p.default for name, p in inspect.signature(Server).parameters.items()
                if name not in ("host", "port", "debug", "tls", "auth", "tracing")}  # below
    assert {option for option, _, _ in SERVER_OPTIONS} | {"health_port", "reuse_port"} == \
        set(keywords)
    for option, default in keywords.items():
        assert getattr(defaults, option) == default
    assert (defaults.tls_cert, defaults.tls_key, defaults.tls_client_ca,
            defaults.auth_token_file, defaults.otel) == (None, None, None, None, False)


def test_session_settings_and_call_limits_are_the_servers_keywords() -> None:
    import dataclasses
    import inspect

    from gradserve.server import Server
    from gradserve.server.service import Limits
    from gradserve.server.transports import SessionSettings

    keywords = inspect.signature(Server).parameters
    for f in dataclasses.fields(SessionSettings):
        if f.name != "owner":   # made per server
            assert f.default == keywords[f.name].default, f.name
    assert {f.name for f in dataclasses.fields(Limits)} <= set(keywords)


def test_every_serve_flag_can_come_from_the_environment(monkeypatch, capsys) -> None:
    from gradserve.server.cli import main, parser
    monkeypatch.setenv("GRADSERVE_MAX_BATCH", "7")
    monkeypatch.setenv("GRADSERVE_MAX_RESIDUAL_BYTES", "1GiB")
    monkeypatch.setenv("GRADSERVE_REUSE_PORT", "yes")
    monkeypatch.setenv("GRADSERVE_TLS_CERT", "/etc/tls/tls.crt")
    args = parser().parse_args(["serve", "m:x", "--max-batch", "9"])
    assert (args.max_batch, args.max_residual_bytes, args.reuse_port, args.tls_cert) == (
        9, 1 << 30, True, "/etc/tls/tls.crt")            # a flag on the command line wins
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "[$GRADSERVE_MAX_DELAY]" in capsys.readouterr().out.replace("\n", " ")
