"""Dynamic batching: concurrent calls of a batchable endpoint merged into one model run.

A batchable endpoint maps over axis 0 of every tensor argument and output.
Its Forward calls that agree on everything but their row counts (structure,
static values, dtypes, trailing shapes, which inputs need grad, whether a
residual is kept) and send no parameters of their own form a group: the
first to arrive leads it and waits at most ``max_delay`` for others, and the
group keeps taking calls while an earlier run of the endpoint is busy, up to
``max_batch`` rows. The leader concatenates the group's inputs, runs the
model once and splits the outputs back by rows. Every call is checked on its
own first, and a merged run that fails is retried call by call, so a bad call
fails alone.

Each caller's residual is a ``Share`` of the merged run's. Vjp calls on one
merged run gather the same way; when they cover at least half its rows, one
backward over the merged graph with their cotangents side by side (zeros for
the rows of callers not in the group) gives every caller exactly the
gradient of its own rows. Fewer, and the group recomputes instead: a merged
forward and backward over its own callers' inputs only. A share is charged
its rows' part of the merged residual plus its own inputs; once shares
holding half the rows are gone (released, evicted, expired) the merged graph
is let go, and later Vjps recompute: a caller that never sends its Vjp keeps
at most twice its charge alive, then only its inputs.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from gradserve.errors import invalid
from gradserve.server.endpoint import Endpoint, Forwarded, Residual
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import dtypes, pytree
from gradserve.wire.codec import Arguments
from gradserve.wire.memory import WireTensor

#: A call waits for others only this long after its endpoint was crowded (calls from two
#: connections, or two at once): seconds, or this many ``max_delay``s if longer.
CROWDED_SECONDS = 1.0
CROWDED_DELAYS = 10

#: A decoded input tensor's wire type: dtype code, shape, requires_grad.
Meta = tuple[int, tuple[int, ...], bool]


class Recorder:
    """A codec ``make_leaf`` that makes the endpoint's arrays and records each input
    tensor's wire type, so a call's batching key costs no second walk."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.metas: list[Meta] = []
        self.made: set[int] = set()

    def __call__(self, wire: WireTensor, path: str) -> Any:
        leaf = self.endpoint.make_leaf(wire, path)
        self.metas.append((wire.dtype, wire.shape, wire.requires_grad))
        self.made.add(id(leaf))
        return leaf


@dataclass
class _Job:
    """One call waiting in a group, and what its run gave it."""

    payload: Any
    rows: int
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Group:
    deadline: float
    jobs: list[_Job] = field(default_factory=list)
    rows: int = 0
    open: bool = True


@dataclass
class _Call:
    """A Forward call as the batcher holds it: inputs, their tensor leaves, structure."""

    inputs: Arguments
    leaves: list[Any]
    treedef: pytree.TreeDef
    need_vjp: bool
    rows: int
    nbytes: int


class MergedRun:
    """The residual of one merged forward, shared by its callers' ``Share``s; let go once
    shares holding half its rows are gone. ``bounds`` are the row ranges of its callers,
    then of the padding rows no caller owns (if any)."""

    def __init__(self, residual: Residual, bounds: list[tuple[int, int]], callers: int):
        self.residual: Residual | None = residual
        self.bounds = bounds
        self.rows = bounds[callers - 1][1]   # the callers' rows
        self.live_rows = self.rows
        self.live = callers
        # re-entrant: a share freed by the garbage collector may finalize inside ``left``
        self._lock = threading.RLock()

    def left(self, rows: int) -> None:
        """A share of ``rows`` rows is gone."""
        with self._lock:
            self.live_rows -= rows
            self.live -= 1
            if self.live_rows * 2 < self.rows:
                self.residual = None


class Share:
    """One caller's part of a merged run: its row range, and its own inputs to recompute
    from once the merged graph is gone."""

    def __init__(self, run: MergedRun, index: int, inputs: Arguments):
        self.run = run
        self.index = index
        self.lo, self.hi = run.bounds[index]
        self.inputs = inputs
        weakref.finalize(self, run.left, self.hi - self.lo)

    @property
    def rows(self) -> int:
        """Rows of the merged run that are this caller's."""
        return self.hi - self.lo


def is_share(residual: Residual) -> bool:
    """Whether a stored residual is a share of a merged run (its Vjp goes to the batcher)."""
    return isinstance(residual.state, Share)


class Batcher:
    """Merges one batchable endpoint's concurrent Forward and Vjp calls. Runs happen in
    the callers' own threads (the group's leader runs it), one at a time per endpoint, each
    inside ``compute`` (the server's bound on runs at once)."""

    def __init__(self, endpoint: Endpoint, compute: Any,
                 clock: Callable[[], float] = time.monotonic):
        self.endpoint = endpoint
        self._compute = compute
        self._clock = clock
        self._cond = threading.Condition()
        self._open: dict[tuple[Any, ...], _Group] = {}
        self._turn = threading.Lock()
        self._stats = pb.BatchStats()
        self._inside = 0   # calls of this endpoint in the batcher now
        self._crowded_until = 0.0   # until when calls wait for others to join them
        self._peers: dict[str, float] = {}   # connections seen lately, and when

    @contextlib.contextmanager
    def _counted(self, peer: str) -> Iterator[None]:
        """Count a call of ``peer`` in the batcher while it is; note whether calls crowd."""
        with self._cond:
            now = self._clock()
            self._inside += 1
            self._peers[peer] = now
            window = max(CROWDED_SECONDS, CROWDED_DELAYS * self.max_delay)
            if len(self._peers) > 1:
                for other, seen in list(self._peers.items()):
                    if now - seen > window:
                        del self._peers[other]
            if self._inside > 1 or len(self._peers) > 1:
                self._crowded_until = now + window
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1

    @property
    def max_batch(self) -> int:
        """Most rows one merged run takes (the endpoint's setting, read at every call)."""
        return self.endpoint.max_batch

    @property
    def max_delay(self) -> float:
        """Longest a call waits for others (the endpoint's setting)."""
        return self.endpoint.max_delay

    def stats(self) -> pb.BatchStats:
        """What batching did so far."""
        with self._cond:
            found = pb.BatchStats()
            found.CopyFrom(self._stats)
            return found

    # -- Forward -------------------------------------------------------------
    def forward(self, inputs: Arguments, recorder: Recorder, need_vjp: bool,
                peer: str) -> Forwarded | None:
        """The outputs (and residual share) of a call of ``peer`` (its connection) from a
        merged run; None when the call cannot be merged (run it alone). Checks the call
        first: a bad one fails alone."""
        self.endpoint.check_arguments(inputs)
        leaves, treedef = pytree.flatten(inputs.tree, lambda x: id(x) in recorder.made)
        metas = recorder.metas
        rows = {shape[0] if shape else -1 for _, shape, _ in metas}
        if inputs.parameters is not None or len(rows) != 1 or min(rows) < 1 \
                or len(leaves) != len(metas):
            return None
        (n,) = rows
        key = ("forward", treedef, need_vjp,
               tuple((code, shape[1:], grad) for code, shape, grad in metas))
        nbytes = sum(dtypes.nbytes(code, shape) for code, shape, _ in metas)
        job = _Job(_Call(inputs, leaves, treedef, need_vjp, n, nbytes), n, self._clock())
        with self._counted(peer):
            self._join(key, job, lambda group: False, self._run_forwards)
            found: Forwarded = job.wait()
        return found

    def _run_forwards(self, jobs: list[_Job]) -> int:
        """Run the group's calls merged (or, if that fails, each alone); how many runs
        served them."""
        calls: list[_Call] = [job.payload for job in jobs]
        try:
            found = self._merged_forward(calls)
        except Exception:
            if len(jobs) == 1:
                raise
            found = None
        if found is None:   # each on its own: only a call that fails gets its error
            for job, call in zip(jobs, calls):
                try:
                    alone = self._merged_forward([call])
                    assert alone is not None   # one call's outputs need no split
                    job.finish(alone[0])
                except Exception as err:
                    job.finish(error=err)
            return len(jobs)
        for job, made in zip(jobs, found):
            job.finish(made)
        return 1

    def _merged_forward(self, calls: list[_Call]) -> list[Forwarded] | None:
        """One run over the calls' inputs side by side; None if its outputs cannot be split
        by rows (the function is not really batchable)."""
        endpoint = self.endpoint
        real = sum(call.rows for call in calls)
        pad = (min(_bucket(real), max(real, self.max_batch)) - real
               if endpoint.pad_batches and len(calls) > 1 else 0)
        if len(calls) == 1:
            merged = calls[0].inputs
        else:
            parts = [c.leaves for c in calls]
            if pad:   # rows of zeros no caller owns: one compiled shape per bucket
                parts.append([endpoint.zeros((pad, *_type(endpoint, x).shape[1:]), x)
                              for x in calls[0].leaves])
            merged = self._side_by_side(parts, calls[0].treedef)
        bounds = _bounds([call.rows for call in calls] + ([pad] if pad else []))
        start = bounds[-1][1]
        made = endpoint.run_forward(merged, calls[0].need_vjp)
        out_leaves, out_def = pytree.flatten(made.outputs, endpoint.is_array)
        if len(calls) > 1 and any(not x.shape or x.shape[0] != start for x in out_leaves):
            return None
        run = MergedRun(made.residual, bounds, len(calls)) if made.residual is not None else None
        found = []
        for i, (call, (lo, hi)) in enumerate(zip(calls, bounds)):
            outputs = (made.outputs if len(calls) == 1 else
                       pytree.unflatten(out_def, [endpoint.rows(x, lo, hi) for x in out_leaves]))
            if run is None:
                found.append(Forwarded(outputs))
                continue
            # a copy: a view would keep every caller's rows of the merged outputs alive
            kept = pytree.unflatten(out_def, [endpoint.rows(x, lo, hi, copy=True)
                                              for x in out_leaves])
            share = Share(run, i, call.inputs)
            charge = made.nbytes * (hi - lo) // start + call.nbytes
            found.append(Forwarded(outputs, Residual(kept, share), charge))
        return found

    # -- Vjp -----------------------------------------------------------------
    def vjp(self, residual: Residual, cotangents: Any, batched: bool, peer: str) -> Arguments:
        """Gradients of a share's rows, from a backward shared with the other Vjps of its
        merged run that arrive meanwhile (or a recompute)."""
        aligned = self.endpoint.check_cotangents(residual.outputs, cotangents, batched)
        share: Share = residual.state
        run = share.run
        job = _Job((share, aligned), share.rows, self._clock())
        key: tuple[Any, ...] = ("vjp", id(job)) if batched else ("vjp", id(run))
        with self._counted(peer):
            self._join(key, job, lambda group: len(group.jobs) >= run.live,
                       lambda jobs: self._run_vjps(jobs, batched))
            grads: Arguments = job.wait()
        return grads

    def _run_vjps(self, jobs: list[_Job], batched: bool) -> int:
        """Backpropagate the group's Vjps in as few runs as give each its unbatched
        gradients; how many runs that took."""
        # A share Vjp'd twice meanwhile goes in a later round; so does a call giving
        # cotangents for other outputs (each then gets None where it would alone).
        rounds: list[tuple[tuple[bool, ...], list[_Job]]] = []   # (outputs without, calls)
        for job in jobs:
            share, cots = job.payload
            without = tuple(c is None for c in cots)
            for pattern, group in rounds:
                if pattern == without and all(other.payload[0] is not share for other in group):
                    group.append(job)
                    break
            else:
                rounds.append((without, [job]))
        runs = 0
        for _, group in rounds:
            found: list[Arguments] | None
            try:
                found = self._merged_vjp(group, batched)
            except Exception as err:
                if len(group) == 1:
                    group[0].finish(error=err)
                    runs += 1
                    continue
                found = None
            if found is None:
                for job in group:
                    try:
                        job.finish(self._merged_vjp([job], batched)[0])
                    except Exception as err:
                        job.finish(error=err)
                runs += len(group)
                continue
            for job, grads in zip(group, found):
                job.finish(grads)
            runs += 1
        return runs

    def _merged_vjp(self, jobs: list[_Job], batched: bool) -> list[Arguments]:
        endpoint = self.endpoint
        shares: list[Share] = [job.payload[0] for job in jobs]
        cots: list[list[Any]] = [job.payload[1] for job in jobs]
        run = shares[0].run
        residual = run.residual
        if residual is not None and 2 * sum(s.rows for s in shares) >= run.rows:
            mine = {s.index: c for s, c in zip(shares, cots)}
            slots = [(hi - lo, mine.get(i)) for i, (lo, hi) in enumerate(run.bounds)]
            bounds = [(s.lo, s.hi) for s in shares]
        else:   # recompute over these callers' own inputs
            is_input = lambda x: endpoint.leaf_type(x) is not None  # noqa: E731
            flat = [pytree.flatten(s.inputs.tree, is_input) for s in shares]
            merged = (shares[0].inputs if len(shares) == 1 else
                      self._side_by_side([leaves for leaves, _ in flat], flat[0][1]))
            made = endpoint.run_forward(merged, need_vjp=True)
            if made.residual is None:
                raise invalid("no input of the call requires grad")
            residual = made.residual
            slots = [(s.rows, c) for s, c in zip(shares, cots)]
            bounds = _bounds([s.rows for s in shares])
            if len(shares) == 1:
                return [endpoint.run_vjp(residual, cots[0], batched)]
        outs = pytree.flatten(residual.outputs, endpoint.is_array)[0]
        grads = endpoint.run_vjp(residual, self._merge_cotangents(outs, slots, batched), batched)
        axis = 1 if batched else 0
        return [Arguments(*pytree.map_leaves(lambda g: endpoint.rows(g, lo, hi, axis),
                                             grads.tree, endpoint.is_array))
                for lo, hi in bounds]

    def _side_by_side(self, leaves: list[list[Any]], treedef: pytree.TreeDef) -> Arguments:
        """Several calls' input leaves (each in ``treedef``'s order) joined along axis 0 into
        one call's arguments."""
        return Arguments(*pytree.unflatten(treedef, [self.endpoint.concat(parts)
                                                     for parts in zip(*leaves)]))

    def _merge_cotangents(self, outs: list[Any], slots: list[tuple[int, list[Any] | None]],
                          batched: bool) -> list[Any]:
        """Cotangents for the merged outputs ``outs``: each slot's rows side by side, its
        caller's cotangents or (no caller, or None given) zeros."""
        endpoint = self.endpoint
        given = [c for _, c in slots if c is not None]
        batch = 0
        if batched:
            batch = next((_type(endpoint, x).shape[0] for c in given for x in c if x is not None),
                         0)   # all None: no cotangent is made
        merged: list[Any] = []
        for k, out in enumerate(outs):
            if all(c[k] is None for c in given):
                merged.append(None)
                continue
            pieces = []
            for rows, c in slots:
                cot = c[k] if c is not None else None
                if cot is None:
                    shape = (rows, *out.shape[1:])
                    cot = endpoint.zeros((batch, *shape) if batched else shape, out)
                pieces.append(cot)
            merged.append(pieces[0] if len(pieces) == 1 else
                          endpoint.concat(pieces, 1 if batched else 0))
        return merged

    # -- groups --------------------------------------------------------------
    def _join(self, key: tuple[Any, ...], job: _Job, full: Callable[[_Group], bool],
              run: Callable[[list[_Job]], int]) -> None:
        """Put ``job`` in the open group of ``key`` (or start one and lead it). The leader
        waits for the group to fill or its deadline, then for the endpoint's turn (still
        taking calls), then runs it; the others wait on their job. A leader waits only while
        the endpoint is crowded (calls from two connections, or two calls at once, lately):
        one client calling in turn never waits."""
        with self._cond:
            group = self._open.get(key)
            if group is not None and group.rows + job.rows > self.max_batch:
                self._close(key, group)
                group = None
            leader = group is None
            if group is None:
                group = self._open[key] = _Group(job.arrived + self.max_delay)
            group.jobs.append(job)
            group.rows += job.rows
            if group.rows >= self.max_batch or full(group):
                self._close(key, group)
        if leader:
            self._lead(key, group, run)

    def _lead(self, key: tuple[Any, ...], group: _Group,
              run: Callable[[list[_Job]], int]) -> None:
        """Wait for company (while crowded, until the deadline), then for the endpoint's turn,
        then run the group. Whatever fails on the way fails every call of the group still
        waiting, and never leaves the group open."""
        try:
            with self._cond:
                while group.open and self._clock() < self._crowded_until:
                    left = group.deadline - self._clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            with self._turn:
                with self._cond:
                    self._close(key, group)
                started, runs = self._clock(), 1
                try:
                    with self._compute:
                        runs = run(group.jobs)
                finally:
                    self._count(key, group, started, runs)
        except BaseException as err:
            with self._cond:
                self._close(key, group)
            for other in group.jobs:
                if not other.done.is_set():
                    other.finish(error=err)

    def _close(self, key: tuple[Any, ...], group: _Group) -> None:
        if group.open:
            group.open = False
            if self._open.get(key) is group:
                del self._open[key]
            self._cond.notify_all()

    def _count(self, key: tuple[Any, ...], group: _Group, started: float, runs: int) -> None:
        with self._cond:
            stats = self._stats
            calls = len(group.jobs)
            if key[0] == "forward":
                stats.forward_runs += runs
                stats.forward_calls += calls
                stats.forward_rows += group.rows
            else:
                stats.vjp_runs += runs
                stats.vjp_calls += calls
            stats.queue_seconds += sum(started - job.arrived for job in group.jobs)
            if runs == 1:
                stats.max_calls = max(stats.max_calls, calls)


def _bounds(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges of parts of ``rows`` rows each, side by side."""
    bounds, start = [], 0
    for n in rows:
        bounds.append((start, start + n))
        start += n
    return bounds


def _bucket(rows: int) -> int:
    """The power of two at or above ``rows``: the sizes a padded merged run takes."""
    return 1 << max(rows - 1, 0).bit_length()


def _type(endpoint: Endpoint, x: Any) -> Any:
    found = endpoint.leaf_type(x)
    assert found is not None
    return found
