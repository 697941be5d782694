"""Replicas behind one client: calls/s of 8 concurrent callers against 1 replica and 3.

Three ``gradserve serve`` processes host the same seeded MLP (``many_clients.make_mlp``:
4 layers of ``Linear(1024, 1024) + Tanh``, unbatched), each computing on one core
(``OMP_NUM_THREADS=1``, ``--workers 1``: a replica stands for one device). ``gradserve.loadgen`` runs 8
callers (2 processes of 4 threads) doing Forward+Vjp on 16 rows in a loop, first with
every client connected to one replica, then to all three (``ipv4:a,b,c``: each Forward
to the less loaded of two, each Vjp to its residual's replica). Printed: the table and
the ratio of calls/s, three replicas over one.

All processes share one machine: on a 2-core development machine three one-core
replicas have two cores between them (and the callers), so the ratio is bounded by
about 2 there; on three machines (or GPUs) it is bounded by 3.

Run with ``python benchmarks/fleet.py [--quick]`` (``make bench``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from gradserve import loadgen

HERE = Path(__file__).resolve().parent
CALLERS = 8
PROCESSES = 2


def start(port: int) -> subprocess.Popen[str]:
    """A replica serving the MLP as "mlp" on ``port``, computing on one core (a replica
    stands for one device: its compute is bounded, whatever the machine has)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gradserve.server.cli", "serve",
         f"{HERE / 'many_clients.py'}:make_mlp", "--name", "mlp", "--port", str(port),
         "--grace", "0", "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(address: str, seconds: float = 120.0) -> None:
    """Return once the replica at ``address`` answers Describe."""
    import time

    import gradserve
    until = time.monotonic() + seconds
    with gradserve.Client(address, transport="grpc", timeout=5) as client:
        while True:
            try:
                client.describe("mlp")
                return
            except gradserve.Unavailable:
                if time.monotonic() > until:
                    raise
                time.sleep(0.2)


def main() -> int:
    """Run the benchmark; prints the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (3 s each)")
    args = p.parse_args()
    duration, warmup = (3.0, 0.5) if args.quick else (8.0, 1.0)
    ports = [free_port() for _ in range(3)]
    procs = [start(port) for port in ports]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    try:
        for address in addresses:
            wait_ready(address)
        results = []
        for label, target in (("1 replica", addresses[0]),
                              ("3 replicas", "ipv4:" + ",".join(addresses))):
            (level,) = loadgen.run(target, "mlp", concurrency=[CALLERS], processes=PROCESSES,
                                   duration=duration, warmup=warmup, backward=True,
                                   shape=(16, 1024),
                                   timeout=60)
            results.append((label, level))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    print(f"Forward+Vjp of 16x1024 float32 through a 4x1024 MLP, {CALLERS} callers "
          f"({PROCESSES} processes), {duration:g} s per run")
    print(f"{'target':<12} {'calls/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7}")
    for label, level in results:
        print(f"{label:<12} {level.calls_per_s:>9.1f} {level.p50_ms or 0:>8.2f} "
              f"{level.p90_ms or 0:>8.2f} {level.p99_ms or 0:>8.2f} "
              f"{sum(level.errors.values()):>7}")
    one, three = results[0][1].calls_per_s, results[1][1].calls_per_s
    print(f"3 replicas / 1 replica, calls/s: {three / one:.2f}x" if one else
          "3 replicas / 1 replica: no calls succeeded against one replica")
    return 0


if __name__ == "__main__":
    sys.exit(main())
