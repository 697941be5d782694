"""A load generator for a gradserve endpoint, like Triton's ``perf_analyzer``.

``run(address, endpoint, concurrency=[1, 4, 16])`` keeps C callers busy for
each concurrency level C, spread over worker processes (each with its own
client; its callers are threads sharing it). One call is a Forward, or with
``backward`` a Forward and a Vjp of the same residual; its latency is the wall
time of both. Every level has a warm-up (not counted) and then a measurement
window that starts at the same moment in every process; a call counts if it
starts inside the window. Failed calls are counted by kind, never fatal.

The server's ``Describe`` before and after the window gives what dynamic
batching did meanwhile (mean calls per model run, mean queueing delay).
``render(levels)`` makes the table ``gradserve bench`` prints. Only numpy
arrays are sent: this module imports neither torch nor JAX.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

import gradserve
from gradserve import frameworks
from gradserve.errors import GradserveError, InvalidArgument, NotFound, RemoteError
from gradserve.wire import dtypes, pytree
from gradserve.wire.specs import BatchStats, TensorType

#: Seconds the worker processes of a level may take to start and connect.
START_SECONDS = 120.0
#: Seconds between progress reports.
PROGRESS_SECONDS = 1.0
#: Seconds a worker may take to report once its window has closed (on top of ``timeout``).
FINISH_SECONDS = 30.0


class LoadError(GradserveError):
    """The load cannot be generated (bad inputs, a worker that failed to start)."""


@dataclass(frozen=True)
class Input:
    """One argument the callers send: ``name`` (None: positional), shape and dtype name."""

    name: str | None
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Level:
    """What one concurrency level measured.

    ``calls`` are the calls that succeeded in the window, ``errors`` the ones
    that failed (by status code, or exception type for local failures), with
    ``error_messages`` the first message of each kind. ``rows`` is ``calls``
    times the leading dimension of the first input; rates are per second of
    ``duration`` (from the window's start until it closed, or until its last call
    returned if that was later).
    Latencies are of successful calls (None where there were none);
    ``mean_batch`` and ``mean_queue_ms`` are None where the server reports
    no batching statistics or ran no batch.
    """

    concurrency: int
    processes: int
    calls: int
    rows: int
    errors: dict[str, int]
    duration: float
    calls_per_s: float
    rows_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_batch: float | None
    mean_queue_ms: float | None
    error_messages: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The level as plain JSON-ready values."""
        return asdict(self)


@dataclass
class _Tally:
    """What one worker process's callers measured in the window."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    last_end: float = 0.0


def split(concurrency: int, processes: int | None) -> list[int]:
    """Callers per worker process: ``concurrency`` over ``processes`` (default one each)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    n = concurrency if processes is None else max(1, min(processes, concurrency))
    return [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]


def plan_inputs(client: gradserve.Client, endpoint: str, shape: Sequence[int] | None = None,
                dtype: str = "float32", rows: int = 16) -> list[Input]:
    """The arguments to send: one of ``shape`` and ``dtype``, else from the declared specs."""
    dtypes.code_of(dtype)
    info = client.describe(endpoint)
    if shape is not None:
        return [Input(None, tuple(int(d) for d in shape), dtype)]
    if not info.inputs:
        raise LoadError(f"endpoint {endpoint!r} declares no input specs: pass --shape "
                        "(and --dtype) to say what to send")
    plan = []
    for name, spec in info.inputs.items():
        dims = tuple(d if d is not None else (rows if i == 0 else 1)
                     for i, d in enumerate(spec.shape))
        plan.append(Input(name if len(info.inputs) > 1 else None, dims, spec.dtype or "float32"))
    return plan


def check_inputs(client: gradserve.Client, endpoint: str, plan: Sequence[Input]) -> None:
    """Raise ``LoadError`` (one line) if the endpoint refuses inputs of these types.

    Uses ``Signature``, which runs nothing; other failures of it (a model that cannot
    be traced, say) are left to show up as errors of the load itself.
    """
    args, kwargs = _arguments([TensorType(i.shape, i.dtype) for i in plan], plan)
    try:
        client.signature(endpoint, args, kwargs)
    except (InvalidArgument, NotFound) as err:
        sent = ", ".join(f"{i.name + '=' if i.name else ''}{TensorType(i.shape, i.dtype)}"
                         for i in plan)
        message = err.message.splitlines()[0] if err.message else str(err)
        raise LoadError(f"endpoint {endpoint!r} refuses {sent}: {message}") from None
    except RemoteError:
        pass


def rows_of(plan: Sequence[Input]) -> int:
    """Rows one call sends: the leading dimension of the first input (1 for a scalar)."""
    return plan[0].shape[0] if plan and plan[0].shape else 1


def run(address: str, endpoint: str, *, concurrency: Sequence[int], processes: int | None = None,
        duration: float = 10.0, warmup: float = 1.0, shape: Sequence[int] | None = None,
        dtype: str = "float32", rows: int = 16, transport: str = "auto", backward: bool = False,
        timeout: float | None = 30.0, progress: Callable[[str], None] | None = None,
        connect: dict[str, Any] | None = None) -> list[Level]:
    """Measure ``endpoint`` at each concurrency level; one ``Level`` per level. ``connect``
    holds further ``gradserve.connect`` keywords (``tls``, ``token``) for every client."""
    if duration <= 0 or warmup < 0:
        raise ValueError("duration must be positive and warmup not negative")
    options = dict(connect or {})
    with gradserve.connect(address, transport="grpc", timeout=timeout, **options) as client:
        plan = plan_inputs(client, endpoint, shape, dtype, rows)
        check_inputs(client, endpoint, plan)
        levels = []
        for c in concurrency:
            levels.append(_level(client, address, endpoint, plan, split(c, processes),
                                 duration=duration, warmup=warmup, transport=transport,
                                 backward=backward, timeout=timeout, progress=progress,
                                 options=options))
        return levels


def _level(client: gradserve.Client, address: str, endpoint: str, plan: list[Input],
           threads: list[int], *, duration: float, warmup: float, transport: str,
           backward: bool, timeout: float | None,
           progress: Callable[[str], None] | None, options: dict[str, Any]) -> Level:
    """Run one concurrency level: start the workers, line up their windows, gather."""
    ctx = multiprocessing.get_context("spawn")
    n = len(threads)
    ready: Any = ctx.Queue()
    results: Any = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    counts = ctx.Array("q", 2 * n)   # per worker: calls, errors so far (in the window)
    workers = [ctx.Process(target=worker, name=f"gradserve-load-{i}", daemon=True,
                           args=(i, address, endpoint, plan, threads[i], transport, timeout,
                                 backward, warmup, duration, start_at, go, ready, results,
                                 counts, options))
               for i in range(n)]
    label = f"concurrency {sum(threads)}"
    try:
        for w in workers:
            w.start()
        _wait_ready(ready, workers, label, progress)
        # time.monotonic() reads one clock in every process of a host (CLOCK_MONOTONIC on
        # Linux); a short lead lets every worker see the start time before it comes
        window = time.monotonic() + 0.05 + warmup
        start_at.value = window - warmup
        go.set()
        _sleep_until(window, progress, lambda: f"{label}: warming up")
        before = _batches(client, endpoint)
        _sleep_until(window + duration, progress,
                     lambda: f"{label}: {time.monotonic() - window:4.1f}/{duration:g} s, "
                             f"calls {sum(counts[0::2])}, errors {sum(counts[1::2])}")
        tallies = _gather(results, workers, label, timeout)
        after = _batches(client, endpoint)
    finally:
        for w in workers:
            if w.pid is None:   # never started
                continue
            if w.is_alive():
                w.terminate()
            w.join(5)
    return _summarise(sum(threads), n, tallies, window, duration, rows_of(plan), before,
                      after)


def _wait_ready(ready: Any, workers: list[Any], label: str,
                progress: Callable[[str], None] | None) -> None:
    """Wait until every worker has connected; a worker's setup failure raises."""
    deadline = time.monotonic() + START_SECONDS
    pending = len(workers)
    while pending:
        if progress is not None:
            progress(f"{label}: starting {len(workers)} processes, {pending} to go")
        try:
            index, problem = ready.get(timeout=PROGRESS_SECONDS)
        except queue.Empty:
            _check_alive(workers, label)
            if time.monotonic() > deadline:
                raise LoadError(f"{label}: workers not ready after {START_SECONDS:g} s") from None
            continue
        if problem:
            raise LoadError(f"worker {index}: {problem}")
        pending -= 1


def _check_alive(workers: list[Any], label: str) -> None:
    for w in workers:
        if w.exitcode not in (None, 0):
            raise LoadError(f"{label}: worker process {w.name} died (exit status {w.exitcode})")


def _sleep_until(when: float, progress: Callable[[str], None] | None,
                 line: Callable[[], str]) -> None:
    while (left := when - time.monotonic()) > 0:
        if progress is not None:
            progress(line())
        time.sleep(min(left, PROGRESS_SECONDS))


def _gather(results: Any, workers: list[Any], label: str, timeout: float | None) -> list[_Tally]:
    """Every worker's tally, once its last call returned."""
    deadline = time.monotonic() + FINISH_SECONDS + (timeout or 0.0) * 2
    tallies: list[_Tally] = []
    while len(tallies) < len(workers):
        try:
            tallies.append(results.get(timeout=PROGRESS_SECONDS))
        except queue.Empty:
            _check_alive(workers, label)
            if time.monotonic() > deadline:
                raise LoadError(f"{label}: workers did not finish their last calls") from None
    return tallies


def _batches(client: gradserve.Client, endpoint: str) -> BatchStats | None:
    try:
        return client.describe(endpoint).batches
    except RemoteError:
        return None


def _summarise(concurrency: int, processes: int, tallies: list[_Tally], window: float,
               duration: float, rows_per_call: int, before: BatchStats | None,
               after: BatchStats | None) -> Level:
    latencies = np.array([x for t in tallies for x in t.latencies], dtype=np.float64)
    errors: dict[str, int] = {}
    messages: dict[str, str] = {}
    for t in tallies:
        for kind, count in t.errors.items():
            errors[kind] = errors.get(kind, 0) + count
        for kind, message in t.messages.items():
            messages.setdefault(kind, message)
    calls = int(latencies.size)
    # the window lasts its duration even where every caller's last call returned before it
    # closed (none starts a call after it closes)
    span = max([t.last_end for t in tallies] + [window + duration]) - window
    elapsed = span if span > 0 else 1e-9
    p50 = p90 = p99 = None
    if calls:
        p50, p90, p99 = (float(v) * 1e3 for v in np.percentile(latencies, [50, 90, 99]))
    mean_batch = mean_queue = None
    if before is not None and after is not None:
        runs = after.forward_runs - before.forward_runs
        served = after.forward_calls - before.forward_calls
        queued = served + after.vjp_calls - before.vjp_calls
        if runs > 0:
            mean_batch = served / runs
        if queued > 0:
            mean_queue = (after.queue_seconds - before.queue_seconds) / queued * 1e3
    return Level(concurrency, processes, calls, calls * rows_per_call, errors, span,
                 calls / elapsed, calls * rows_per_call / elapsed, p50, p90, p99,
                 mean_batch, mean_queue, messages)


# -- the worker processes ------------------------------------------------------

def worker(index: int, address: str, endpoint: str, plan: list[Input], threads: int,
           transport: str, timeout: float | None, backward: bool, warmup: float,
           duration: float, start_at: Any, go: Any, ready: Any, results: Any,
           counts: Any, options: dict[str, Any]) -> None:
    """One worker process: ``threads`` callers sharing a client (a ``spawn`` target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops the workers
    try:
        client = gradserve.connect(address, transport=transport, timeout=timeout, **options)
        values = _values(plan, seed=1000 + index)
    except Exception as err:  # reported to the parent, which stops the run
        ready.put((index, f"{type(err).__name__}: {err}".splitlines()[0]))
        return
    ready.put((index, ""))
    caller = _Caller(client, endpoint, *_arguments(values, plan), backward)
    go.wait()
    begin = start_at.value
    window = begin + warmup
    end = window + duration
    tally = _Tally()
    lock = threading.Lock()
    time.sleep(max(0.0, begin - time.monotonic()))

    def loop() -> None:
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                return
            problem = caller.call()
            t1 = time.monotonic()
            if t0 < window:
                continue
            with lock:
                tally.last_end = max(tally.last_end, t1)
                if problem is None:
                    tally.latencies.append(t1 - t0)
                    counts[2 * index] += 1
                else:
                    kind, message = problem
                    tally.errors[kind] = tally.errors.get(kind, 0) + 1
                    tally.messages.setdefault(kind, message)
                    counts[2 * index + 1] += 1

    callers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    results.put(tally)
    results.close()
    results.join_thread()
    client.close()
    # skip the interpreter's teardown: grpc's threads can abort in static destructors
    os._exit(0)


class _Caller:
    """Makes one call (a Forward, with ``backward`` also a Vjp) and classifies failures."""

    def __init__(self, client: gradserve.Client, endpoint: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any], backward: bool):
        self.client = client
        self.endpoint = endpoint
        self.args = args
        self.kwargs = kwargs
        self.backward = backward
        self._cotangents: Any = None
        self._lock = threading.Lock()

    def call(self) -> tuple[str, str] | None:
        """One call; None if it succeeded, else (kind, message) of its failure."""
        try:
            result = self.client.forward(self.endpoint, self.args, self.kwargs,
                                         need_vjp=self.backward)
            if self.backward and result.residual is not None:
                self.client.vjp(result.residual, self._cotangents_for(result.outputs))
        except RemoteError as err:
            return err.code.name, _first_line(str(err))
        except Exception as err:  # counted like the server's failures; the load goes on
            return type(err).__name__, _first_line(f"{type(err).__name__}: {err}")
        return None

    def _cotangents_for(self, outputs: Any) -> Any:
        with self._lock:
            if self._cotangents is None:
                self._cotangents = cotangents_like(outputs)
            return self._cotangents


def cotangents_like(outputs: Any) -> Any:
    """Cotangents mirroring ``outputs``: 0.01 for floating arrays, None elsewhere."""
    def cotangent(x: Any) -> Any:
        adapter = frameworks.adapter_for(x)
        if adapter is None or adapter.wire_dtype(x) not in dtypes.DIFFERENTIABLE:
            return None
        return np.full(np.shape(x), 0.01, dtype=x.dtype)

    return pytree.map_leaves(cotangent, outputs,
                             lambda x: isinstance(x, (np.ndarray, np.generic)))


def _values(plan: Sequence[Input], seed: int) -> list[np.ndarray[Any, Any]]:
    """Seeded random arrays for ``plan``: normal values, small integers, random booleans."""
    rng = np.random.default_rng(seed)
    values = []
    for item in plan:
        target = dtypes.numpy_dtype(dtypes.code_of(item.dtype))
        if item.dtype == "bool":
            values.append(rng.random(item.shape) < 0.5)
        elif item.dtype.startswith(("int", "uint")):
            values.append(rng.integers(0, 8, item.shape).astype(target))
        elif item.dtype.startswith("complex"):
            values.append((rng.standard_normal(item.shape)
                           + 1j * rng.standard_normal(item.shape)).astype(target))
        else:
            values.append(rng.standard_normal(item.shape).astype(np.float32).astype(target))
    return values


def _arguments(values: Sequence[Any], plan: Sequence[Input]) -> tuple[tuple[Any, ...],
                                                                       dict[str, Any]]:
    """``values`` as a call's (args, kwargs): by name where the plan names them."""
    args = tuple(v for v, i in zip(values, plan) if i.name is None)
    kwargs = {i.name: v for v, i in zip(values, plan) if i.name is not None}
    return args, kwargs


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


# -- the table -----------------------------------------------------------------

COLUMNS = ("concurrency", "procs", "calls/s", "rows/s", "p50 ms", "p90 ms", "p99 ms", "errors",
           "mean batch", "queue ms")


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(levels: Sequence[Level]) -> str:
    """The levels as an aligned text table, one row per level."""
    rows = [COLUMNS]
    for lv in levels:
        rows.append((str(lv.concurrency), str(lv.processes), _number(lv.calls_per_s),
                     _number(lv.rows_per_s, 0), _number(lv.p50_ms, 2), _number(lv.p90_ms, 2),
                     _number(lv.p99_ms, 2), str(sum(lv.errors.values())),
                     _number(lv.mean_batch, 2), _number(lv.mean_queue_ms, 2)))
    return aligned(rows)


def aligned(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as right-aligned text columns (the first row the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)
