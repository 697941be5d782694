"""Shared fixtures: a server started on a free loopback port, and a client to it; a server
in another process; clients whose calls go through a fault-injecting channel. Plain helpers are in helpers.py."""

from __future__ import annotations

import subprocess
from typing import Any, Callable, Iterator

import pytest

import gradserve
from gradserve.server import Server
from helpers import free_port, serve_process, wait_serving


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[Server, gradserve.Client]]]:
    """``serve(endpoints, **server_options)`` -> (started server, connected client).

    ``endpoints`` maps names to torch modules/functions (or Endpoint objects).
    Everything started is stopped at teardown.
    """
    started: list[tuple[Server, gradserve.Client]] = []

    def start(endpoints: dict[str, Any], client_options: dict | None = None,
              **options: Any) -> tuple[Server, gradserve.Client]:
        server = Server("127.0.0.1", 0, **options)
        for name, fn in endpoints.items():
            if isinstance(fn, gradserve.server.Endpoint):
                server.add(name, fn)
            else:
                server.add_torch(name, fn)
        server.start()
        client = gradserve.connect(server.address, **(client_options or {}))
        started.append((server, client))
        return server, client

    yield start
    for server, client in started:
        client.close()
        server.stop(grace=0)


@pytest.fixture
def serve_elsewhere() -> Iterator[Callable[..., tuple[str, subprocess.Popen[str]]]]:
    """``serve_elsewhere(target, *flags, port=None, env=None)`` -> (address, process) of
    ``gradserve serve tests/cli_targets.py:<target>`` in another process (``env`` added to
    its environment), once it is SERVING; every
    process started is killed at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(target: str, *flags: str, port: int | None = None,
              env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen[str]]:
        port = port or free_port()
        proc = serve_process(target, port, *flags, env=env)
        started.append(proc)
        address = f"127.0.0.1:{port}"
        wait_serving(address).close()
        return address, proc

    yield start
    for proc in started:
        proc.kill()
        proc.communicate(timeout=30)


@pytest.fixture
def faulty() -> Iterator[Callable[..., tuple[gradserve.Client, Any]]]:
    """``faulty(address, **client_options)`` -> (connected client, its ``FaultChannel``),
    as ``faults.fault_client`` makes them; every client made is closed at teardown (before
    the servers of ``serve``, when the test names ``serve`` first)."""
    from faults import fault_client

    made: list[gradserve.Client] = []

    def connect(address: str, **options: Any) -> tuple[gradserve.Client, Any]:
        client, channel = fault_client(address, **options)
        made.append(client)
        return client, channel

    yield connect
    for client in made:
        client.close()


@pytest.fixture
def x64() -> Iterator[None]:
    """JAX with 64-bit types, for this test only (the server threads see it too)."""
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
