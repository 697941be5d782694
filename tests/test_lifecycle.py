"""Owned lifecycles, exclusive ports, import hygiene and the seams tests rely on."""

from __future__ import annotations

import ast
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

import gradserve
from gradserve.server import Server
from helpers import wait_until, without_ucx
from models import mlp

ROOT = Path(__file__).resolve().parents[1]


def gradserve_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("gradserve")}


def quiet() -> set[str]:
    """The gradserve threads once the executor workers of servers that earlier tests
    stopped (``gradserve_N``; they end when their last call does) have ended."""
    wait_until(lambda: not any(n.startswith("gradserve_") for n in gradserve_threads()),
               timeout=10, message=lambda: f"threads {sorted(gradserve_threads())}")
    return gradserve_threads()


def settled(expected: set[str], deadline: float = 5.0) -> set[str]:
    """The gradserve threads once those that were told to end have ended (fails the test,
    naming them, if they are not ``expected`` within ``deadline`` seconds)."""
    wait_until(lambda: gradserve_threads() == expected, timeout=deadline,
               message=lambda: f"threads {sorted(gradserve_threads())}, "
                               f"expected {sorted(expected)}")
    return gradserve_threads()


def test_nothing_starts_before_start_and_stop_ends_everything() -> None:
    before = quiet()
    server = Server("127.0.0.1", 0)
    server.add_torch("mlp", mlp())
    assert gradserve_threads() == before          # the constructor starts no thread
    server.start()
    client = gradserve.Client(server.address)
    assert gradserve_threads() - before == {"gradserve-drop", "gradserve-idle", "gradserve-ttl"}
    client.open()                                  # negotiates: a session and its keep-alive
    client.forward("mlp", (np.ones((2, 6), np.float32),))
    assert "gradserve-keepalive" in gradserve_threads()
    client.close()
    server.stop(grace=0)
    assert settled(before) == before


def test_a_constructor_that_raises_leaks_no_thread() -> None:
    before = quiet()
    with pytest.raises(ValueError, match="transport must be one of .*, got 'carrier-pigeon'"):
        gradserve.Client("127.0.0.1:1", transport="carrier-pigeon")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{holder.getsockname()[1]}: "
                                          "the port is in use"):
            Server("127.0.0.1", holder.getsockname()[1])
    finally:
        holder.close()
    assert settled(before) == before


def test_a_second_server_cannot_take_a_port_in_use() -> None:
    first = Server("127.0.0.1", 0)
    first.add_torch("mlp", mlp())
    first.start()
    try:
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{first.port}: the port "
                                          r"is in use .*reuse_port=True"):
            Server("127.0.0.1", first.port)
        with gradserve.connect(first.address) as client:
            assert [e.name for e in client.endpoints()] == ["mlp"]
    finally:
        first.stop(grace=0)


def test_reuse_port_is_an_explicit_choice() -> None:
    first = Server("127.0.0.1", 0, reuse_port=True)
    second = Server("127.0.0.1", first.port, reuse_port=True)
    assert second.port == first.port
    for server in (first, second):
        server.start()
        server.stop(grace=0)


def test_auto_fallback_is_logged_as_a_warning(serve, monkeypatch, caplog) -> None:
    from gradserve.client.transports import shm

    server, _ = serve({"mlp": mlp()}, client_options={"transport": "grpc"})
    monkeypatch.setattr(shm, "available", lambda: "this machine has no writable /dev/shm")
    without_ucx(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="gradserve.client"):
        client = gradserve.connect(server.address)
    client.close()
    assert client.transport == "grpc"
    assert client.fallback_reason.startswith("shm: this machine has no writable /dev/shm")
    (record,) = [r for r in caplog.records if r.name == "gradserve.client"]
    assert record.levelno == logging.WARNING
    assert "using the grpc transport" in record.getMessage()


def test_a_closed_client_says_so_for_every_call(serve) -> None:
    server, _ = serve({"mlp": mlp()})
    client = gradserve.connect(server.address)
    assert client.transport == "shm"
    client.close()
    client.close()   # twice is harmless
    assert client.transport == "grpc" and client.session_info() is None
    x = np.ones((1, 6), np.float32)
    for call in (client.endpoints, lambda: client.describe("mlp"),
                 lambda: client.parameters("mlp"), lambda: client.forward("mlp", (x,)),
                 lambda: client.signature("mlp", (x,))):
        with pytest.raises(gradserve.GradserveError,
                           match=f"this client of {server.address} is closed"):
            call()


def test_a_failed_start_stops_what_it_started() -> None:
    from gradserve.client.transports import shm

    before = quiet()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        server = Server(health_port=taken.getsockname()[1])
        lock = f"{shm.SHM_DIR}/gradserve-{server.sessions.settings.owner}.lock"
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
            server.start()            # the health port is taken: after the shm lock was
    finally:
        taken.close()
    assert not Path(lock).exists()
    assert settled(before) == before


def test_options_with_an_endpoint_object_are_refused() -> None:
    from gradserve.server import TorchEndpoint

    server = Server()
    with pytest.raises(TypeError, match="device, timeout given with a TorchEndpoint, which has "
                                        "its own: pass them to its constructor"):
        server.add("d", TorchEndpoint(torch.sin), device="cpu", timeout=3)


def test_an_injected_channel_is_used_and_left_open(serve) -> None:
    from faults import FaultChannel

    server, _ = serve({"mlp": mlp()})
    channel = FaultChannel(grpc.insecure_channel(server.address))
    with gradserve.connect(server.address, channel=channel) as client:
        client.endpoints()
    assert channel.calls["ListEndpoints"] == 1 and channel.calls["OpenSession"] == 1
    stub = gradserve.v1.gradserve_pb2_grpc.GradserveStub(channel.inner)
    assert stub.ListEndpoints(gradserve.v1.gradserve_pb2.ListEndpointsRequest()).endpoints
    channel.close()


ENCODE_FRESH = """
import sys, gradserve
assert "gradserve.frameworks.torch" not in sys.modules
import torch
with gradserve.connect(sys.argv[1], transport="grpc") as client:
    print(client.forward("double", (torch.ones(3),)).outputs.tolist())
"""


def test_sending_a_tensor_does_not_depend_on_what_was_imported(serve) -> None:
    server, _ = serve({"double": lambda x: x * 2})
    out = subprocess.run([sys.executable, "-c", ENCODE_FRESH, server.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[2.0, 2.0, 2.0]"


def test_get_parameters_of_a_cancelled_call_ends_quietly(serve, caplog) -> None:
    from gradserve.v1 import gradserve_pb2 as pb

    class Broken(torch.nn.Linear):
        def named_parameters(self, *args, **kwargs):
            if getattr(self, "broken", False):
                raise RuntimeError("weights are gone")
            return super().named_parameters(*args, **kwargs)

    model = Broken(2, 2)
    server, _ = serve({"lin": model}, client_options={"transport": "grpc"})
    server.registry.get("lin").module.broken = True

    class Cancelled:
        def is_active(self) -> bool:
            return False

        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

        def invocation_metadata(self) -> tuple:
            return ()

    with caplog.at_level(logging.INFO, logger="gradserve.server"):
        frames = list(server.service.GetParameters(pb.GetParametersRequest(endpoint="lin"),
                                                   Cancelled()))
    assert frames == []
    assert any("ended before its error could be sent: RuntimeError: weights are gone"
               in r.getMessage() for r in caplog.records)


def source_modules() -> dict[str, Path]:
    """Every gradserve source module by dotted name."""
    found = {}
    for base in (ROOT / "client", ROOT / "server"):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The gradserve modules ``path`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def test_no_import_cycles_among_source_modules() -> None:
    modules = source_modules()
    graph = {name: imports_of(path, name, modules) for name, path in modules.items()}
    # a package's own __init__ importing its submodules is how Python packages work;
    # a cycle is a module reaching back to itself through others
    graph = {name: {t for t in deps if not name.startswith(t + ".") and not t == "gradserve"}
             for name, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert "gradserve.client.core" in graph and "gradserve.wire.framing" in graph


def test_the_client_core_and_the_wire_name_no_framework_and_no_transport() -> None:
    neutral = ["client/gradserve/client/core.py", "client/gradserve/client/session.py",
               "client/gradserve/client/remote.py", "client/gradserve/wire/codec.py",
               "client/gradserve/wire/framing.py", "client/gradserve/wire/slots.py",
               "server/gradserve/server/service.py", "server/gradserve/server/sessions.py",
               "server/gradserve/server/endpoint.py", "server/gradserve/server/host.py"]
    for path in neutral:
        tree = ast.parse((ROOT / path).read_text())
        names = {alias.name for node in ast.walk(tree)
                 if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in node.names} | {node.module or "" for node in ast.walk(tree)
                                             if isinstance(node, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] in ("torch", "jax", "cupy")}, path
        assert not {n for n in names if n.endswith((".shm", ".cuda_ipc", ".torch", ".jax"))}, path


def test_the_package_says_it_is_typed() -> None:
    import importlib.resources
    import re

    assert importlib.resources.files("gradserve").joinpath("py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"gradserve"\s*=\s*\["py.typed"\]', pyproject)   # shipped in the wheel
