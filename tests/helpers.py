"""Plain helpers the test modules share (fixtures live in conftest.py).

Imported as a module (``from helpers import raw, wait_until``), like ``faults`` and
``models``: pytest puts this folder on ``sys.path``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client.transports import shm
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

T = TypeVar("T")

#: Skips a test (or, as ``pytestmark``, a module) where there is no usable /dev/shm.
needs_shm = pytest.mark.skipif(bool(shm.available()), reason="needs /dev/shm")


def _has_cuda() -> bool:
    import torch

    from gradserve.client.transports import cuda_ipc
    return bool(torch.cuda.is_available()) and not cuda_ipc.unavailable()


#: Whether torch sees a CUDA device and CuPy is there (the real CUDA IPC path can run).
HAS_CUDA = _has_cuda()
#: Skips a test that needs a CUDA device and CuPy (give it the ``gpu`` mark too).
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and CuPy")


def without_ucx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process's clients find UCX unavailable (so ``auto`` falls back to gRPC
    bytes where the same-host transports do not work)."""
    from gradserve.client.transports.ucx import UcxTransport
    monkeypatch.setattr(UcxTransport, "unavailable", staticmethod(lambda: "UCX is off here"))


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               message: str | Callable[[], str] = "") -> T:
    """Poll ``predicate`` until it returns something true, and return that; fail the test
    (AssertionError, with ``message``) if it has not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = message() if callable(message) else message
            raise AssertionError(f"not so within {timeout} s"
                                 + (f": {said}" if said else f" (last value {value!r})"))
        time.sleep(interval)


def raw(server: Any) -> pb_grpc.GradserveStub:
    """A bare stub on the server's port, for requests no client would send."""
    return pb_grpc.GradserveStub(grpc.insecure_channel(server.address))


def ask_shm(region_bytes: int = 1 << 20) -> pb.OpenSessionRequest:
    """An OpenSession request for shared-memory regions of ``region_bytes``."""
    return pb.OpenSessionRequest(transports=[pb.TransportRequest(kind=pb.SHARED_MEMORY,
                                                                 region_bytes=region_bytes)])


def double(x: Any) -> Any:
    return x * 2


def shm_names(server: Any = None) -> list[str]:
    """Region names in /dev/shm (not servers' lock files): all gradserve's, or ``server``'s."""
    prefix = f"gradserve-{server.sessions.settings.owner}-" if server is not None else "gradserve-"
    return sorted(n for n in os.listdir(shm.SHM_DIR)
                  if n.startswith(prefix) and not n.endswith(".lock"))


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


TARGETS = str(Path(__file__).resolve().parent / "cli_targets.py")


def serve_process(target: str, port: int, *flags: str,
                  env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``gradserve serve tests/cli_targets.py:<target>`` on ``port``, as another process
    (``env``: added to this one's environment)."""
    return subprocess.Popen([sys.executable, "-m", "gradserve.server.cli", "serve",
                             f"{TARGETS}:{target}", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def wait_serving(address: str, deadline: float = 60) -> grpc.Channel:
    """A channel to ``address`` once its server says SERVING (fails the test after
    ``deadline`` seconds)."""
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, timeout=deadline, interval=0.2, message=f"no server on {address}")
    return channel


def scrape(port: int) -> dict[str, float]:
    """The metrics page as {series: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found


def series(name: str, **labels: str) -> str:
    """A series key as Prometheus prints it (labels sorted by name)."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if labels else name
