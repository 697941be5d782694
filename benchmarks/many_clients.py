"""Many clients at once: what dynamic batching buys a compute-bound endpoint.

The endpoint is a 4-layer, 1024-wide MLP (``Linear(1024, 1024) + Tanh`` x4,
seeded weights), served as a batchable torch endpoint by a server in its own
process. N client processes (N = 1, 4, 16; ``gradserve.loadgen``) each call
Forward+Vjp on 16 rows of float32 in a loop, first with batching off
(``max_batch=0``: every call is its own model run), then on (calls merged up
to ``max_batch`` rows, waiting at most ``max_delay`` for company). Next to it,
one in-process loop does the same work locally: forward and ``autograd.grad``
of a 16-row batch, and of the 16*N-row batch that perfect batching would run.

Printed: the table; rows/s with batching on over off at each N; the p99
latency with batching on at N=16 over the unbatched single client's p50; the
two targets as PASS/FAIL lines (reported, not asserted); and a check that
gradients computed through the batching server by several concurrent
processes equal local, unbatched autograd of the same weights.

All processes share one machine, so the numbers say how the server uses its
cores under contention, not what a dedicated server would do.

Run with ``python benchmarks/many_clients.py [--quick]`` (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

# No torch at module level: the load generator's worker processes are spawned, and each
# imports this module again as __mp_main__.
import gradserve
from gradserve import loadgen

WIDTH = 1024
LAYERS = 4
ROWS = 16
SEED = 0
ENDPOINT = "mlp"
#: Batching "on": a merged run takes up to 16 calls of 16 rows.
MAX_BATCH = 256
MAX_DELAY = 0.002
#: Largest difference allowed between served and local gradients, relative to the largest
#: local magnitude (absolute where that is below 1).
TOLERANCE = 1e-5


def make_mlp() -> Any:
    """The benchmark's model, seeded: the server and the local checks build the same one."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    model = nn.Sequential(*layers).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- the server process ----------------------------------------------------------

def serve(max_batch: int, max_delay: float) -> None:
    """Host the MLP until stdin closes; prints one JSON line: address, how batching was set."""
    from gradserve.server import Server

    server = Server("127.0.0.1", 0)
    server.add_torch(ENDPOINT, make_mlp(), batchable=True, max_batch=max_batch,
                     max_delay=max_delay)
    server.start()
    print(json.dumps({"address": server.address}), flush=True)
    sys.stdin.read()
    server.stop(grace=0)
    sys.stdout.flush()
    os._exit(0)   # skip teardown: torch's and grpc's thread pools can abort in it


class ServerProcess:
    """The MLP served in a child process, batching on or off."""

    def __init__(self, max_batch: int, max_delay: float):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--max-batch", str(max_batch),
             "--max-delay", str(max_delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"the server process exited ({self.proc.returncode})")
        started = json.loads(line)
        self.address: str = started["address"]

    def close(self) -> None:
        """Stop the server (closing its stdin), killing it if it does not go."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- local baselines -----------------------------------------------------------------

def local_rows_per_s(rows: int, seconds: float) -> tuple[float, float]:
    """Rows/s and ms per step (median) of forward + ``autograd.grad`` of a ``rows``-row
    batch in this process."""
    import torch

    model = make_mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, WIDTH, generator=g).requires_grad_(True)
    ct = torch.full((rows, WIDTH), 0.01)

    def step() -> None:
        torch.autograd.grad(model(x), x, ct)

    for _ in range(3):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))   # the median: steady against other load on the machine
    return rows / median, median * 1e3


# -- the gradient check ---------------------------------------------------------------

def grad_worker(address: str, index: int, calls: int, go: Any, out: Any) -> None:
    """Forward+Vjp of seeded inputs through the server; sends back (x, ct, y, grad)s."""
    try:
        rows = (16, 7, 16, 3)[index % 4]   # uneven calls: merged runs must split them right
        rng = np.random.default_rng(100 + index)
        xs = [rng.standard_normal((rows, WIDTH)).astype(np.float32) for _ in range(calls)]
        ct = rng.standard_normal((rows, WIDTH)).astype(np.float32)
        client = gradserve.connect(address, timeout=60)
        out.put(("ready", index, None))
        go.wait()
        samples = []
        for x in xs:
            result = client.forward(ENDPOINT, (x,), need_vjp=True)
            assert result.residual is not None
            (grad,) = client.vjp(result.residual, ct).args
            samples.append((x, ct, result.outputs, grad))
        client.close()
        out.put(("done", index, samples))
    except Exception as err:   # reported by the parent
        out.put(("error", index, f"{type(err).__name__}: {err}"))


def check_gradients(address: str, processes: int, calls: int) -> str:
    """Gradients from ``processes`` concurrent clients of the batching server, compared to
    local autograd of the same weights; the verdict line."""
    import torch

    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    go = ctx.Event()
    workers = [ctx.Process(target=grad_worker, args=(address, i, calls, go, out), daemon=True)
               for i in range(processes)]
    with gradserve.connect(address, transport="grpc", timeout=30) as client:
        for w in workers:
            w.start()
        try:
            replies = [out.get(timeout=120) for _ in workers]
            problems = [r[2] for r in replies if r[0] == "error"]
            if problems:
                return f"gradients: FAIL (a client failed: {problems[0]})"
            before = client.describe(ENDPOINT).batches
            go.set()
            replies = [out.get(timeout=300) for _ in workers]
            after = client.describe(ENDPOINT).batches
        finally:
            for w in workers:
                w.join(10)
    problems = [r[2] for r in replies if r[0] == "error"]
    if problems:
        return f"gradients: FAIL (a client failed: {problems[0]})"
    model = make_mlp()
    worst = 0.0
    count = 0
    for _, _, samples in replies:
        for x, ct, y, grad in samples:
            xt = torch.from_numpy(x).requires_grad_(True)
            y_local = model(xt)
            (g_local,) = torch.autograd.grad(y_local, xt, torch.from_numpy(ct))
            for served, local in ((y, y_local.detach()), (grad, g_local)):
                scale = max(1.0, float(local.abs().max()))
                worst = max(worst, float((torch.from_numpy(served) - local).abs().max()) / scale)
            count += 1
    batching = ""
    if before is not None and after is not None and after.forward_runs > before.forward_runs:
        mean = (after.forward_calls - before.forward_calls) / (after.forward_runs
                                                                 - before.forward_runs)
        batching = f", mean batch {mean:.2f} calls during the check"
    verdict = "PASS" if worst <= TOLERANCE else "FAIL"
    return (f"gradients: {verdict}: {count} Forward+Vjp calls from {processes} concurrent "
            f"processes (rows 16/7/16/3) against the batching server equal local unbatched "
            f"autograd: max relative difference {worst:.2e} (limit {TOLERANCE:g}){batching}")


# -- the table -----------------------------------------------------------------------

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--serve``, be its server)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter levels (3 s each)")
    p.add_argument("--clients", default="1,4,16", help="client processes per level")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per level")
    p.add_argument("--max-delay", type=float, default=MAX_DELAY,
                   help="batching on: longest a call waits for others")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help="batching on: most rows of one merged run")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.max_batch, args.max_delay)
        return 0
    clients = [int(n) for n in args.clients.split(",")]
    duration = args.duration or (3.0 if args.quick else 8.0)
    warmup = 0.5 if args.quick else 1.0
    local_seconds = 0.5 if args.quick else 1.5
    print(f"many_clients: {LAYERS}x Linear({WIDTH}, {WIDTH})+Tanh, Forward+Vjp of {ROWS} rows "
          f"float32 per call, {duration:g} s per level, {os.cpu_count()} CPUs shared by "
          "server, clients and local loop", flush=True)

    local = {rows: local_rows_per_s(rows, local_seconds)
             for rows in sorted({ROWS, *(ROWS * n for n in clients)})}
    modes = {"off": (0, 0.0), "on": (args.max_batch, args.max_delay)}
    results: dict[tuple[str, int], loadgen.Level] = {}
    gradients = ""
    for mode, (max_batch, max_delay) in modes.items():
        with ServerProcess(max_batch, max_delay) as server:
            print(f"batching {mode}: max_batch={max_batch}, max_delay={max_delay:g} s "
                  f"on {server.address}", flush=True)
            for n in clients:
                (level,) = loadgen.run(server.address, ENDPOINT, concurrency=[n],
                                       duration=duration, warmup=warmup, shape=(ROWS, WIDTH),
                                       backward=True, timeout=120)
                results[mode, n] = level
                print(f"  N={n}: {level.rows_per_s:,.0f} rows/s, p50 {_ms(level.p50_ms)} ms, "
                      f"errors {sum(level.errors.values())}", flush=True)
            if mode == "on":
                gradients = check_gradients(server.address, processes=4,
                                            calls=4 if args.quick else 10)

    rows = [("batching", "N", "calls/s", "rows/s", "p50 ms", "p99 ms", "mean batch", "errors",
             "on/off rows/s", "local 16 rows/s", "local 16N rows/s")]
    for (mode, n), lv in results.items():
        off = results.get(("off", n))
        ratio = (f"{lv.rows_per_s / off.rows_per_s:.2f}x"
                 if mode == "on" and off is not None and off.rows_per_s else "")
        rows.append((mode, str(n), f"{lv.calls_per_s:,.1f}", f"{lv.rows_per_s:,.0f}",
                     _ms(lv.p50_ms), _ms(lv.p99_ms),
                     "-" if lv.mean_batch is None else f"{lv.mean_batch:.2f}",
                     str(sum(lv.errors.values())), ratio, f"{local[ROWS][0]:,.0f}",
                     f"{local[ROWS * n][0]:,.0f}"))
    print()
    print(loadgen.aligned(rows))
    for (mode, n), lv in results.items():
        for kind, message in lv.error_messages.items():
            print(f"batching {mode}, N={n}: {lv.errors[kind]} x {kind}, first: {message}")
    print("local (one process, no server): "
          + ", ".join(f"{r} rows {ms:.2f} ms/step" for r, (_, ms) in local.items()))

    print()
    top = max(clients)
    on, off, single = results.get(("on", top)), results.get(("off", top)), results.get(("off", 1))
    if on is not None and off is not None and off.rows_per_s:
        gain = on.rows_per_s / off.rows_per_s
        print(f"{'PASS' if gain >= 3 else 'FAIL'}: at N={top} batching on gives >= 3x the rows/s "
              f"of batching off: {on.rows_per_s:,.0f} / {off.rows_per_s:,.0f} = {gain:.2f}x")
    if on is not None and single is not None and on.p99_ms is not None \
            and single.p50_ms is not None:
        bound = 2 * single.p50_ms + args.max_delay * 1e3
        print(f"{'PASS' if on.p99_ms < bound else 'FAIL'}: p99 stays under 2x the unbatched "
              f"single-client latency + max_delay: p99(on, N={top}) {on.p99_ms:.2f} ms vs "
              f"2 x {single.p50_ms:.2f} + {args.max_delay * 1e3:g} = {bound:.2f} ms "
              f"(ratio p99/p50(off, N=1) {on.p99_ms / single.p50_ms:.2f}, "
              f"max_delay {args.max_delay * 1e3:g} ms)")
        # Little's law: N callers that always have a call out wait N / (calls/s) on average
        print(f"  (with N={top} callers always waiting, the mean latency is N / calls/s = "
              f"{top / on.calls_per_s * 1e3:.1f} ms at {on.calls_per_s:,.1f} calls/s; under "
              f"{bound:.1f} ms takes {top / bound * 1e3:,.0f} calls/s, "
              f"{top / bound * 1e3 * ROWS:,.0f} rows/s, against the "
              f"{local[ROWS * top][0]:,.0f} rows/s one local loop reaches at {ROWS * top} rows)")
    print(gradients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
