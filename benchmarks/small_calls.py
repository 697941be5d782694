"""The cost of one small remote step next to two bare gRPC unary echoes of the same bytes.

A server process hosts ``y = tanh(x @ W)`` (256 wide, float32) and, on a second
port, a bare gRPC echo (a unary method returning its request bytes). This
process times, in interleaved rounds:

- ``echo x2``: two unary echoes of ``rows x 256`` float32 bytes (what a Forward
  and a Vjp move, with no work done);
- ``floor``: the least any Python gRPC server running this model per call can cost: two
  bare unary calls of raw bytes whose handlers run the model's forward (keeping its
  graph) and then ``autograd.grad`` (no protocol, checks, metrics or residual store);
- ``forward+vjp``: ``client.forward(..., need_vjp=True)`` then ``client.vjp``
  (numpy arrays, bytes in gRPC messages);
- ``torch step``: ``f(x).backward(ct)`` through ``client.torch`` over gRPC bytes,
  and over shared memory (``shm``);
- ``local``: the same step in this process with torch.

Client and server are separate processes, as the target asks. Medians; the ratios
are what to read on a shared machine. Run ``python benchmarks/small_calls.py
[--quick] [--rows 16,64]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent import futures
from typing import Callable

import grpc
import numpy as np
import torch

import gradserve

WIDTH = 256
ECHO = "/bench.Echo/Echo"
BARE_FORWARD, BARE_VJP = "/bench.Echo/Forward", "/bench.Echo/Vjp"
#: The target: a small Forward+Vjp costs at most this many times two bare unary echoes.
TARGET = 1.5


def _ident(data: bytes) -> bytes:
    return data


def serve(port: int, echo_port: int) -> None:
    """The server process: gradserve on ``port``, a bare unary echo on ``echo_port``."""
    from gradserve.server import Server

    weight = torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(0)) / 16
    server = Server("127.0.0.1", port)
    server.add_torch("layer", lambda x: torch.tanh(x @ weight))
    server.start()
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []   # one caller: its last forward

    def bare_forward(request: bytes, context: object) -> bytes:
        x = torch.frombuffer(bytearray(request), dtype=torch.float32).reshape(-1, WIDTH)
        x.requires_grad_(True)
        y = torch.tanh(x @ weight)
        kept[:] = [(x, y)]
        return y.detach().numpy().tobytes()

    def bare_vjp(request: bytes, context: object) -> bytes:
        x, y = kept.pop()
        ct = torch.frombuffer(bytearray(request), dtype=torch.float32).reshape(y.shape)
        (grad,) = torch.autograd.grad(y, x, ct)
        return grad.numpy().tobytes()

    echo = grpc.server(futures.ThreadPoolExecutor(8))
    echo.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req, _ident, _ident),
        "Forward": grpc.unary_unary_rpc_method_handler(bare_forward, _ident, _ident),
        "Vjp": grpc.unary_unary_rpc_method_handler(bare_vjp, _ident, _ident)}),))
    echo.add_insecure_port(f"127.0.0.1:{echo_port}")
    echo.start()
    server.wait()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure(steps: dict[str, Callable[[], object]], rounds: int, per_round: int
            ) -> dict[str, float]:
    """Median seconds of each step, sampled in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(20):
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    """Print the small-call table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples")
    p.add_argument("--rows", default="16,64", help="row counts (comma list)")
    p.add_argument("--serve", nargs=2, type=int, metavar=("PORT", "ECHO_PORT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return
    torch.set_num_threads(1)
    port, echo_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(echo_port)])
    address = f"127.0.0.1:{port}"
    try:
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{echo_port}")).result(60)
        clients = {t: gradserve.connect(address, transport=t, timeout=30)
                   for t in ("grpc", "shm")}
        echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}")
        echo = echo_channel.unary_unary(ECHO, _ident, _ident)
        bare_forward = echo_channel.unary_unary(BARE_FORWARD, _ident, _ident)
        bare_vjp = echo_channel.unary_unary(BARE_VJP, _ident, _ident)
        weight = torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(0)) / 16
        rounds, per_round = (5, 40) if args.quick else (15, 60)
        print(f"small calls: y = tanh(x @ W), W {WIDTH}x{WIDTH}, float32; server in another "
              f"process; median ms of {rounds * per_round} samples each "
              f"({os.cpu_count()} cores)")
        print(f"{'rows':>6} {'KiB':>5} {'echo x2':>8} {'floor':>7} {'fwd+vjp':>8} {'ratio':>6} "
              f"{'/floor':>6} {'torch':>7} {'ratio':>6} {'shm':>7} {'local':>7} {'verdict':>8}")
        for rows in [int(r) for r in args.rows.split(",")]:
            x = np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float32)
            ct = np.ones((rows, WIDTH), np.float32)
            payload = x.tobytes()
            xt = torch.tensor(x, requires_grad=True)
            ctt = torch.tensor(ct)
            numpy_client = clients["grpc"]

            ct_bytes = ct.tobytes()

            def floor() -> None:
                y = np.frombuffer(bare_forward(payload), np.float32).reshape(rows, WIDTH)
                np.frombuffer(bare_vjp(ct_bytes), np.float32).reshape(y.shape)

            def forward_vjp() -> None:
                result = numpy_client.forward("layer", (x,), need_vjp=True)
                numpy_client.vjp(result.residual, ct)

            def torch_step(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
                def step() -> None:
                    f(xt).backward(ctt)
                return step

            def local() -> None:
                torch.tanh(xt @ weight).backward(ctt)

            medians = measure({
                "echo x2": lambda: (echo(payload), echo(payload)),
                "floor": floor,
                "fwd+vjp": forward_vjp,
                "torch": torch_step(clients["grpc"].torch("layer")),
                "shm": torch_step(clients["shm"].torch("layer")),
                "local": local,
            }, rounds, per_round)
            ms = {k: v * 1e3 for k, v in medians.items()}
            ratio = ms["fwd+vjp"] / ms["echo x2"]
            verdict = "PASS" if ratio <= TARGET else "FAIL"
            print(f"{rows:>6} {rows * WIDTH * 4 >> 10:>5} {ms['echo x2']:>8.3f} "
                  f"{ms['floor']:>7.3f} {ms['fwd+vjp']:>8.3f} {ratio:>5.2f}x "
                  f"{ms['fwd+vjp'] / ms['floor']:>5.2f}x {ms['torch']:>7.3f} "
                  f"{ms['torch'] / ms['echo x2']:>5.2f}x {ms['shm']:>7.3f} {ms['local']:>7.3f} "
                  f"{verdict:>8}")
        print(f"target: a {16}x{WIDTH} Forward+Vjp costs at most {TARGET}x two bare unary "
              "echoes of the same bytes")
        print("floor: two bare unary calls whose handlers run the model's forward and "
              "autograd.grad; /floor: fwd+vjp over it (what gradserve itself adds)")
        for client in clients.values():
            client.close()
        echo_channel.close()
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
