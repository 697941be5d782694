"""TLS, mutual TLS and token auth: who can reach the server, and what a token allows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve import TLSConfig
from gradserve.server import Server
from gradserve.server.auth import Tokens
from gradserve.v1 import gradserve_pb2 as pb
from helpers import needs_shm, scrape, series

certs_module = pytest.importorskip("certs")

TRAINER = "trainer-0123456789abcdef"
VIEWER = "viewer-0123456789abcdef0"


def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@pytest.fixture
def certs(tmp_path: Path) -> Any:
    return certs_module.make(tmp_path)


@pytest.fixture
def started() -> Iterator[Any]:
    """``started(**server_options)`` -> a started server hosting ``double`` and a
    ``torch.nn.Linear`` as ``linear``; stopped at teardown."""
    servers: list[Server] = []

    def start(**options: Any) -> Server:
        server = Server("127.0.0.1", 0, **options)
        server.add_torch("double", double)
        server.add_torch("linear", torch.nn.Linear(3, 2))
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


def tokens(tmp_path: Path) -> Tokens:
    path = tmp_path / "tokens"
    path.write_text(f"# who may call\n{TRAINER} name=trainer\n"
                    f"{VIEWER} name=viewer endpoints=double parameters=no sessions=no\n")
    return Tokens.load(path)


def calls_double(client: gradserve.Client) -> None:
    out = client.forward("double", (np.arange(4, dtype=np.float32),)).outputs
    np.testing.assert_array_equal(out, np.arange(4, dtype=np.float32) * 2)


def test_tls_serves_a_verified_client_and_refuses_plaintext(started, certs) -> None:
    server = started(tls=TLSConfig(cert=certs.server_cert, key=certs.server_key))
    with gradserve.connect(server.address, tls=TLSConfig(ca=certs.ca), transport="grpc",
                           timeout=10) as client:
        calls_double(client)
    with gradserve.connect(server.address, transport="grpc", timeout=5) as plain:
        with pytest.raises(gradserve.Unavailable):
            plain.endpoints()
    with gradserve.connect(server.address, tls=TLSConfig(ca=certs.other_ca), transport="grpc",
                           timeout=5) as untrusting:   # the server's CA is not this one
        with pytest.raises(gradserve.Unavailable):
            untrusting.endpoints()


def test_mutual_tls_refuses_a_client_without_a_certificate(started, certs) -> None:
    server = started(tls=TLSConfig(cert=certs.server_cert, key=certs.server_key,
                                   client_ca=certs.ca))
    with gradserve.connect(server.address, transport="grpc", timeout=10, tls=TLSConfig(
            ca=certs.ca, cert=certs.client_cert, key=certs.client_key)) as client:
        calls_double(client)
    with gradserve.connect(server.address, tls=TLSConfig(ca=certs.ca), transport="grpc",
                           timeout=5) as anonymous:
        with pytest.raises(gradserve.Unavailable):
            anonymous.endpoints()


@needs_shm
def test_shared_memory_sessions_work_over_a_tls_control_channel(started, certs) -> None:
    server = started(tls=TLSConfig(cert=certs.server_cert, key=certs.server_key))
    with gradserve.connect(server.address, tls=TLSConfig(ca=certs.ca), transport="shm",
                           timeout=10) as client:
        assert client.transport == "shm"
        x = np.arange(1 << 16, dtype=np.float32)              # 256 KiB: through a slot
        np.testing.assert_array_equal(client.forward("double", (x,)).outputs, 2 * x)
        assert client.session_info().copied == 1


def test_tokens_authenticate_and_scope_calls(started, tmp_path, monkeypatch) -> None:
    server = started(auth=tokens(tmp_path), metrics_port=0)
    with gradserve.connect(server.address, transport="grpc", timeout=10) as anonymous:
        with pytest.raises(gradserve.Unauthenticated, match="a valid token is required"):
            anonymous.endpoints()
    with gradserve.connect(server.address, transport="grpc", timeout=10,
                           token="not-a-token-of-this-server") as wrong:
        with pytest.raises(gradserve.Unauthenticated):
            wrong.forward("double", (np.ones(2, np.float32),))
    found = scrape(server.metrics_port)   # refused calls are counted (and logged) too
    for method in ("ListEndpoints", "ForwardUnary"):
        assert found[series("gradserve_requests_total", method=method, endpoint="-",
                            code="UNAUTHENTICATED")] == 1
    with gradserve.connect(server.address, token=TRAINER, timeout=10) as trainer:
        calls_double(trainer)
        assert {e.name for e in trainer.endpoints()} == {"double", "linear"}
        assert set(trainer.parameters("linear")) == {"weight", "bias"}
    with gradserve.connect(server.address, token=VIEWER, timeout=10) as viewer:
        calls_double(viewer)
        assert viewer.transport == "grpc"                     # no sessions for this token
        assert "may not open same-host sessions" in viewer.fallback_reason
        assert [e.name for e in viewer.endpoints()] == ["double"]
        with pytest.raises(gradserve.PermissionDenied,
                           match="token 'viewer' may not call endpoint 'linear'"):
            viewer.forward("linear", (np.ones((1, 3), np.float32),))
        with pytest.raises(gradserve.PermissionDenied, match="may not call endpoint 'linear'"):
            viewer.describe("linear")
        with pytest.raises(gradserve.PermissionDenied, match="may not read endpoint parameters"):
            viewer.parameters("double")
    monkeypatch.setenv("GRADSERVE_TOKEN", TRAINER)
    with gradserve.connect(server.address, transport="grpc", timeout=10) as from_env:
        calls_double(from_env)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING   # probes need no token


def test_token_files_and_tls_settings_are_checked(tmp_path) -> None:
    bad = {
        "short name=x\n": "a token must have at least 16 characters",
        f"{TRAINER} colour=blue\n": "expected name=, endpoints=, parameters= or sessions=",
        f"{TRAINER} sessions=maybe\n": "sessions= takes yes or no, got 'maybe'",
        "# nothing\n": "token auth needs at least one token",
        f"{TRAINER} name=a\n{VIEWER} name=a\n": "token names must differ",
        f"{TRAINER} name=a\n{TRAINER} name=b\n": "a token is listed twice",
    }
    for text, message in bad.items():
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            Tokens.load(path)
    with pytest.raises(ValueError, match="cannot be read"):
        Tokens.load(tmp_path / "missing")
    path.write_text(f"{TRAINER}#tail name=hashed  # a comment\n")   # '#' inside a token
    assert [(t.secret, t.name) for t in Tokens.load(path).tokens] == [
        (f"{TRAINER}#tail", "hashed")]
    with pytest.raises(ValueError, match="a TLS server needs both cert and key"):
        TLSConfig(cert=tmp_path / "x.pem").server_credentials()
    with pytest.raises(ValueError, match="TLS certificate '.*missing.pem' cannot be read"):
        TLSConfig(cert=tmp_path / "missing.pem", key=tmp_path / "k").server_credentials()
    with pytest.raises(ValueError, match="needs both cert and key"):
        TLSConfig(cert=tmp_path / "c.pem").channel_credentials()


def test_a_certificate_or_key_that_is_not_one_is_named_before_listening(certs) -> None:
    garbage = certs.ca.with_name("garbage.pem")
    garbage.write_text("not a certificate\n")
    for cert, key in ((garbage, certs.server_key), (certs.server_cert, certs.client_key)):
        with pytest.raises(ValueError, match=f"TLS certificate '{cert}' and key '{key}' are not "
                                             "a PEM certificate chain and its private key"):
            TLSConfig(cert=cert, key=key).server_credentials()
    with pytest.raises(ValueError, match=f"TLS client CA '{garbage}' is not PEM certificates"):
        TLSConfig(cert=certs.server_cert, key=certs.server_key,
                  client_ca=garbage).server_credentials()


def test_the_command_line_serves_and_calls_with_tls_and_a_token(certs, tmp_path) -> None:
    import signal
    import subprocess
    import sys

    from helpers import free_port, wait_until

    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TRAINER} name=trainer\n")
    mine = tmp_path / "my-token"
    mine.write_text(TRAINER + "\n")
    port, health_port = free_port(), free_port()
    address = f"localhost:{port}"
    cli = [sys.executable, "-m", "gradserve.server.cli"]
    proc = subprocess.Popen([*cli, "serve", "gradserve.server.models.digits:endpoints",
                             "--port", str(port), "--health-port", str(health_port),
                             "--tls-cert", str(certs.server_cert), "--tls-key",
                             str(certs.server_key), "--auth-token-file", str(token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{health_port}"))

        def serving() -> bool:
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
            except grpc.RpcError:
                return False

        wait_until(serving, timeout=60, interval=0.2)
        tls = ["--tls-ca", str(certs.ca)]
        listing = subprocess.run([*cli, "list", address, *tls, "--token-file", str(mine)],
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        assert "digits(x: torch.Tensor) -> torch.Tensor  [torch on cpu, batchable]" in \
            listing.stdout
        refused = subprocess.run([*cli, "list", address, *tls], capture_output=True, text=True,
                                 timeout=60, env={k: v for k, v in __import__("os").environ.items()
                                                  if k != "GRADSERVE_TOKEN"})
        assert refused.returncode == 1
        assert refused.stderr.startswith("gradserve: UNAUTHENTICATED: a valid token is required")
        assert "Traceback" not in refused.stderr
        bench = subprocess.run([*cli, "bench", address, "digits", *tls, "--token-file",
                                str(mine), "--concurrency", "1", "--duration", "0.5",
                                "--warmup", "0.2", "--json"],
                               capture_output=True, text=True, timeout=120)
        assert bench.returncode == 0, bench.stderr
        assert '"calls_per_s"' in bench.stdout and '"errors": {}' in bench.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def vjp_by_id(stub: Any, rid: str) -> grpc.RpcError:
    """A Vjp naming residual ``rid`` alone (no inputs to recompute from): its error."""
    request = pb.VjpRequest(endpoint="double", residual_id=rid, cotangents=pb.Value(
        tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[4], data=bytes(16))))
    with pytest.raises(grpc.RpcError) as info:
        stub.VjpUnary(request, timeout=10)
    return info.value


@needs_shm
def test_another_clients_residuals_and_sessions_look_unknown(started) -> None:
    server = started()
    with gradserve.connect(server.address, transport="shm", timeout=10) as owner, \
            gradserve.connect(server.address, transport="grpc", timeout=10) as other:
        x = np.arange(4, dtype=np.float32)
        result = owner.forward("double", (x,), need_vjp=True)
        rid = result.residual.id
        stolen = vjp_by_id(other.stub, rid)
        unknown = vjp_by_id(other.stub, "no-such-residual")
        assert stolen.code() == unknown.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert stolen.details().replace(rid, "ID") == unknown.details().replace(
            "no-such-residual", "ID")                   # exactly as for an unknown id
        assert other.stub.Release(pb.ReleaseRequest(residual_ids=[rid])).released == 0
        assert server.residuals.stats("double").count == 1
        np.testing.assert_array_equal(owner.vjp(result.residual, np.ones(4, np.float32)).args[0],
                                      np.full(4, 2.0, np.float32))

        # the owner's session: another client can neither keep, close nor use it
        big = np.arange(1 << 16, dtype=np.float32)      # 256 KiB: its reply lies in a slot
        out = owner.forward("double", (big,)).outputs
        sid = owner.session_info().id
        assert not other.stub.KeepAlive(pb.SessionRequest(session_id=sid)).open
        other.stub.CloseSession(pb.SessionRequest(session_id=sid))
        reply_region = next(r for r in owner.session_info().regions if r.direction == "reply")
        other.stub.Release(pb.ReleaseRequest(session=pb.SessionState(id=sid, freed_slots=[
            pb.SlotRef(region=reply_region.index, offset=0, generation=g) for g in range(4)])))
        header = pb.ForwardRequest(endpoint="double", session=pb.SessionState(id=sid),
                                   args=pb.Value(tuple_value=pb.Sequence(items=[pb.Value(
                                       tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[4],
                                                        slot=pb.SlotRef(region=1, nbytes=16)))])))
        with pytest.raises(grpc.RpcError) as info:
            other.stub.ForwardUnary(header, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no confirmed same-host session" in info.value.details()
        assert server.sessions.count() == 1 and owner.session_info().id == sid
        assert server.sessions.info(sid).used_bytes("reply") == big.nbytes   # still viewed
        again = owner.forward("double", (big,)).outputs  # a fresh slot: the first is held
        np.testing.assert_array_equal(out, 2 * big)
        np.testing.assert_array_equal(again, 2 * big)


def test_with_tokens_ownership_follows_the_token(started, tmp_path) -> None:
    server = started(auth=tokens(tmp_path))
    with gradserve.connect(server.address, token=TRAINER, transport="grpc") as trainer, \
            gradserve.connect(server.address, token=TRAINER, transport="grpc") as again, \
            gradserve.connect(server.address, token=VIEWER, transport="grpc") as viewer:
        rid = trainer.forward("double", (np.ones(4, np.float32),), need_vjp=True).residual.id
        assert vjp_by_id(viewer.stub, rid).code() == grpc.StatusCode.FAILED_PRECONDITION
        grads = again.stub.VjpUnary(pb.VjpRequest(
            endpoint="double", residual_id=rid, cotangents=pb.Value(tensor=pb.Tensor(
                dtype=pb.FLOAT32, shape=[4], data=np.ones(4, np.float32).tobytes()))), timeout=10)
        assert np.frombuffer(grads.args.tuple_value.items[0].tensor.data, np.float32).tolist() \
            == [2.0, 2.0, 2.0, 2.0]                     # the same token: the same principal



def test_the_examples_call_a_tls_and_token_server_from_the_environment(certs, tmp_path,
                                                                        monkeypatch) -> None:
    """The README's walk-through: a TLS + token server, and an unchanged example calling it
    with $GRADSERVE_TLS_CA and $GRADSERVE_TOKEN."""
    import os
    import subprocess
    import sys

    from gradserve.server.models.digits import endpoints

    server = Server("127.0.0.1", 0, tls=TLSConfig(cert=certs.server_cert, key=certs.server_key),
                    auth=tokens(tmp_path))
    for name, endpoint in endpoints().items():
        server.add(name, endpoint)
    server.start()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, GRADSERVE_TLS_CA=str(certs.ca), GRADSERVE_TOKEN=TRAINER)
    try:
        done = subprocess.run([sys.executable, str(root / "examples" / "saliency.py"),
                               "--address", server.address, "--index", "13"], env=env,
                              cwd=root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "true label 0, predicted 0" in done.stdout
        monkeypatch.setenv("GRADSERVE_TLS_CA", str(certs.ca))   # connect() reads it too
        monkeypatch.setenv("GRADSERVE_TOKEN", TRAINER)
        with gradserve.connect(server.address) as client:
            assert client.tls == TLSConfig(ca=str(certs.ca))
            assert [e.name for e in client.endpoints()] == ["digits"]
        with gradserve.connect(server.address, tls=False, timeout=5) as plain:
            with pytest.raises(gradserve.Unavailable):          # tls=False: plaintext
                plain.endpoints()
    finally:
        server.stop(grace=0)


@needs_shm
def test_with_tokens_the_per_connection_limits_count_per_token(started, tmp_path) -> None:
    server = started(auth=tokens(tmp_path), max_sessions_per_peer=1)
    with gradserve.connect(server.address, token=TRAINER) as first, \
            gradserve.connect(server.address, token=TRAINER) as second:
        assert first.transport == "shm"
        assert second.transport == "grpc"       # another connection, but the same token
        assert "this connection (or token) holds 1 same-host sessions" in second.fallback_reason
        calls_double(second)
