"""Remote endpoints as JAX functions, differentiable to any order in either mode.

``RemoteJaxFunction`` binds the primitives of :mod:`gradserve.client.jax_primitives`
(a call, its Jvp and its Vjp, at any level of kept Vjps), so it works under
``jax.grad``/``vjp``, ``jvp``, ``linearize``, ``jacfwd``/``jacrev``, ``hessian``, and any
composition of them, with ``jit`` and ``vmap``. This module runs them on the host. Output
shapes come from the server's ``Signature`` RPC (cached per input signature).

A Forward that a derivative will follow returns, besides the outputs, a *token*
naming the residual it kept; the Vjp sends a Vjp of that residual, and a Vjp kept for a
higher derivative returns the token of its own residual (a *level*). JAX may elide or
duplicate host calls under ``jit``, so a token is only an optimisation: one that is
unknown re-sends the inputs (and the cotangents of every level) and the server recomputes.

Under ``vmap`` every operand of a host call has the batch axes in front (size one where
it is not batched). A ``batchable`` endpoint's forward then goes as one call with the
batch merged into its own axis 0; others go one call per element. A Vjp (or Jvp) whose
cotangents (tangents) are batched where the forward's inputs are not becomes one call
with a batch of cotangents (``jacrev``, ``jacfwd``, ``hessian``).

Eager calls (no argument is a tracer) skip the callback: results become ``jax.Array``s
through DLPack, which on CPU alias a 64-byte-aligned array without a copy. Over the
shared-memory transport the outputs and gradients then live in the reply regions, whose
slot stays in use as long as the ``jax.Array`` does. Traced calls copy.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradserve.client import jax_primitives as prims
from gradserve.client.calls import Call, Level, Residual
from gradserve.client.core import Client, numpy_leaf
from gradserve.client.jax_primitives import Mask, Params, Signature, batch_of, jax_dtype, \
    numpy_dtype, pick, spread
from gradserve.client.remote import CallDef, RemoteEndpoint, flatten_call, mergeable
from gradserve.errors import GradserveError
from gradserve.lru import LRU
from gradserve.wire import pytree
from gradserve.wire.codec import Arguments
from gradserve.wire.specs import TensorType

#: Residuals (of forwards and kept Vjps) awaiting their Vjp (older ones are released;
#: each Vjp consumes its own, and a second Vjp of the same one recomputes).
RESIDUALS_KEPT = 256
#: Residuals a JVP has used, kept for a transpose or a reverse mode over it that may
#: follow (forward over reverse); pure forward mode leaves no more than these behind.
SEEN_KEPT = 16
#: Input signatures whose output structure is kept.
SIGNATURES_KEPT = 256
Index = tuple[int, ...]


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


@dataclass
class _Record:
    """The remote calls one host call made, laid out over its batch: one call (``batch``
    ()), one merged call, or one per element (row-major); and their residuals once kept
    (a level's record holds only residuals)."""

    batch: tuple[int, ...]
    merged: bool
    calls: list[Call]
    residuals: list[Residual] = field(default_factory=list)
    mask: Mask = ()   # the inputs its residuals differentiate

    def residual(self, i: int) -> Residual:
        """The residual of call ``i``: the one kept, else an id-less one that recomputes."""
        return self.residuals[i] if self.residuals else Residual(self.calls[i])

    def index(self, idx: Index) -> int:
        """Which call serves batch element ``idx`` of a host call whose batch axes end in
        this record's (axes of size one broadcast)."""
        if not self.batch or self.merged:
            return 0
        tail = idx[len(idx) - len(self.batch):]
        return int(np.ravel_multi_index(tuple(i if s > 1 else 0 for i, s in zip(tail, self.batch)),
                                        self.batch))

    def fits(self, keyed: Sequence[Any], k: int, mask: Mask) -> bool:
        """Whether operands ``keyed`` (with ``k`` batch axes) are laid out as this record
        was made (its axes last, any new ones of size one), and it differentiates the
        inputs ``mask`` flags."""
        kr = len(self.batch)
        return kr <= k and all(r or not m for r, m in zip(self.mask, mask)) and all(
            all(s == 1 for s in a.shape[:k - kr])
            and all(s in (1, r) for s, r in zip(a.shape[k - kr:k], self.batch)) for a in keyed)


class RemoteJaxFunction(RemoteEndpoint):
    """A remote endpoint called on ``jax.Array`` pytrees, differentiable with JAX.

    ``f(*args, **kwargs)`` uses the server's parameters; ``f.apply(params,
    *args, **kwargs)`` sends the caller's own (``client.jax_params(name)``
    gives the server's as a starting point) and differentiates them too.
    ``residuals_kept`` bounds the residuals awaiting a Vjp.
    """

    framework = "jax"

    def __init__(self, client: Client, name: str, *, timeout: float | None = None,
                 residuals_kept: int = RESIDUALS_KEPT):
        super().__init__(client, name, timeout=timeout)
        self._signatures: LRU[tuple[Any, ...], Signature] = LRU(SIGNATURES_KEPT)
        self._records: LRU[int, _Record] = LRU(residuals_kept)
        self._seen: LRU[int, _Record] = LRU(min(SEEN_KEPT, residuals_kept))
        self._tokens = itertools.count(1)
        self._failure = threading.local()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(Arguments(args, kwargs))

    def apply(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        """Call with client-held ``params`` (a pytree like the endpoint's own)."""
        return self._call(Arguments(args, kwargs, params))

    def _call(self, inputs: Arguments) -> Any:
        leaves, call_def = flatten_call(inputs, _is_leaf)
        leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]
        in_types = tuple(TensorType(tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype).name)
                         for x in leaves)
        sig = self._signature(call_def, in_types)
        self._failure.error = None
        try:
            out_leaves = prims.call(self, sig, leaves)
        except Exception as err:
            # JAX reports a failed callback as its own error type; where the call ran
            # eagerly, give back the gradserve error (under jit its text is in JAX's message;
            # a host called directly raised it itself)
            failure, self._failure.error = self._failure.error, None
            if failure is not None and failure is not err:
                raise failure from err
            raise
        return pytree.unflatten(sig.out_def, out_leaves)

    def _signature(self, call_def: CallDef, in_types: tuple[TensorType, ...]) -> Signature:
        key = (call_def.treedef, in_types)
        sig = self._signatures.get(key)
        if sig is None:
            parts = call_def.unflatten(in_types)
            outputs = self.client.signature(self.name, parts.args, parts.kwargs, parts.parameters,
                                            timeout=self.timeout)
            out_types, out_def = pytree.flatten(outputs, lambda x: isinstance(x, TensorType))
            sig = Signature(call_def, in_types, out_def, tuple(out_types))
            self._signatures.put(key, sig)
        return sig

    # -- the host side of the primitives -----------------------------------
    def host(self, kind: str, params: Params, arrays: list[Any]) -> Sequence[Any]:
        """Run primitive ``kind`` on numpy operands (batch axes in front); its results."""
        run: Callable[[Params, list[Any]], Sequence[Any]] = getattr(self, f"_host_{kind}")
        try:
            results = run(params, arrays)
        except GradserveError as err:
            self._failure.error = err
            raise
        batch = batch_of(arrays, params.operand_types(kind))
        return [np.asarray(r).astype(jax_dtype(t), copy=False).reshape(batch + t.shape)
                for r, t in zip(results, params.result_types(kind))]

    def _host_call(self, p: Params, xs: list[Any]) -> list[Any]:
        sig = p.sig
        batch = batch_of(xs, sig.in_types)
        need_vjp = p.keep and any(p.mask)
        record = self._plan(sig, xs, batch, p.mask if need_vjp else None, merge=True)
        results = [self.forward(call, numpy_leaf, need_vjp=need_vjp) for call in record.calls]
        outs = _unbatch_outputs(sig, [r[0] for r in results], batch, record)
        token = 0
        if need_vjp:
            record.residuals = [r[1] for r in results if r[1] is not None]
            token = self._keep(record)
        return [*outs, np.broadcast_to(np.int32(token), batch)]

    def _host_jvp(self, p: Params, arrays: list[Any]) -> list[Any]:
        sig = p.sig
        n = len(sig.in_types)
        xs, tangents = arrays[:n], spread(arrays[n + 1:], p.t_mask)
        batch = batch_of(arrays, p.operand_types("jvp"))
        if sig.below is not None:
            return self._level_jvp(p, xs, arrays[n], tangents, batch)
        self._take(arrays[n], xs, 0, (), seen=True)   # a Jvp needs no residual; keep it near
        x_batch = batch_of(xs, sig.in_types) if xs else batch

        def run(idxs: list[Index]) -> list[Any]:
            call = self.make_call(sig.in_def, [_at(x, idxs[0]) for x in xs], p.mask)
            given = sig.in_def.unflatten(_gathered(tangents, sig.in_types, idxs, batch))
            _, out_tangents = self.jvp(call, given, numpy_leaf, batched=len(idxs) > 1)
            found = pytree.flatten_up_to(sig.out_def, out_tangents)
            return [f for f, d in zip(found, sig.diff_out) if d]

        return _grouped(batch, lambda idx: _key(idx, x_batch), run,
                        pick(sig.out_types, sig.diff_out))

    def _level_jvp(self, p: Params, xs: list[Any], token: Any, tangents: list[Any],
                   batch: tuple[int, ...]) -> list[Any]:
        """``J_G (dz, dw)`` at a level ``G`` over ``F``, per batch element: the ``z`` part of
        ``G``'s Vjp along ``dz`` (its Jacobian in ``z`` is a Hessian, so symmetric), plus
        ``F``'s Vjp along ``dw``."""
        sig = p.sig
        below = sig.below
        assert below is not None
        nb = len(below.in_types)
        record = self._take(token, xs, len(batch), p.mask, seen=True) or self._recompute(p, xs)
        t_z, t_w = tangents[:nb], spread(tangents[nb:], sig.ct_mask)

        def run(idxs: list[Index]) -> list[Any]:
            residual = record.residual(record.index(idxs[0]))
            batched = len(idxs) > 1
            total: list[Any] = [None] * nb
            if any(t is not None for t in t_z):
                along = pytree.unflatten(sig.out_def, _gathered(t_z, below.in_types, idxs, batch))
                grads = self.vjp(residual, along, numpy_leaf, batched=batched)
                total = _sum(total, sig.in_def.grads(grads)[:nb])
            if any(t is not None for t in t_w):
                along = pytree.unflatten(below.out_def,
                                         _gathered(t_w, below.out_types, idxs, batch))
                grads = self.vjp(_below(residual), along, numpy_leaf, batched=batched)
                total = _sum(total, below.in_def.grads(grads))
            return pick(total, sig.diff_out)

        return _grouped(batch, record.index, run, pick(sig.out_types, sig.diff_out))

    def _host_vjp(self, p: Params, arrays: list[Any]) -> list[Any]:
        sig = p.sig
        n = len(sig.in_types)
        xs, token = arrays[:n], arrays[n]
        cts = [None if c is None else _conj(np.asarray(c, numpy_dtype(t)))
               for c, t in zip(spread(arrays[n + 1:], p.ct_mask), sig.out_types)]
        batch = batch_of(arrays, p.operand_types("vjp"))
        record = self._take(token, xs, len(batch), p.mask, seen=p.keep)
        if record is None or (record.merged and (p.keep or len(record.batch) != len(batch))):
            record = self._recompute(p, xs)
        if p.keep:
            grads, levels = self._kept(p, record, cts, batch)
            return [*_conj_all(grads), np.broadcast_to(np.int32(self._keep(levels)), batch)]
        if record.merged:
            return _conj_all(self._vjp_merged(p, record, cts))
        g_types = pick(sig.in_types, p.g_mask)

        def run(idxs: list[Index]) -> list[Any]:
            cotangents = pytree.unflatten(sig.out_def, _gathered(cts, sig.out_types, idxs, batch))
            grads = self.vjp(record.residual(record.index(idxs[0])), cotangents, numpy_leaf,
                             batched=len(idxs) > 1)
            return pick(sig.in_def.grads(grads), p.g_mask)

        return _conj_all(_grouped(batch, record.index, run, g_types))

    # -- records -------------------------------------------------------------
    def _keep(self, record: _Record) -> int:
        """A new token for ``record`` (the oldest beyond the bound are released)."""
        token = next(self._tokens) % (2**31 - 1) + 1
        self._records.put(token, record)
        return token

    def _take(self, token: Any, keyed: Sequence[Any], k: int, mask: Mask, *,
              seen: bool = False) -> _Record | None:
        """The record under ``token`` if it is laid out for operands ``keyed`` with ``k``
        batch axes and differentiates the inputs ``mask`` flags; consumed (released once
        used), unless ``seen``: then kept among the few a JVP used."""
        values = np.unique(np.asarray(token))
        if values.size != 1:
            return None
        key = int(values[0])
        record = self._records.pop(key) or self._seen.pop(key)
        if record is not None and seen:
            self._seen.put(key, record)
        return record if record is not None and record.fits(keyed, k, mask) else None

    def _recompute(self, p: Params, xs: list[Any]) -> _Record:
        """The record of calls that remake, from its inputs ``xs``, the residual of level
        ``p.sig``: the Forward, then the kept Vjps above it (sent as one call with each)."""
        sig = p.sig
        batch = batch_of(xs, sig.in_types)
        below = sig.below
        if below is None:
            return self._plan(sig, xs, batch, p.mask, merge=False)
        nb = len(below.in_types)
        base = self._recompute(Params(p.fn, below, p.mask[:nb]), xs[:nb])
        flags = iter(p.mask[nb:])
        ws = [(w, next(flags)) if w is not None else (None, False)
              for w in spread(xs[nb:], sig.ct_mask)]
        residuals = []
        for idx in np.ndindex(*batch):
            made = base.residual(base.index(idx))
            cts = [None if w is None else np.asarray(_at(w, idx)) for w, _ in ws]
            level = Level(pytree.unflatten(below.out_def, cts),
                          requires_grad=_flags(c for c, (_, f) in zip(cts, ws) if f))
            residuals.append(Residual(made.call, levels=(*made.levels, level)))
        return _Record(batch, False, [], residuals, p.mask)

    def _kept(self, p: Params, record: _Record, cts: list[Any],
              batch: tuple[int, ...]) -> tuple[list[Any], _Record]:
        """One Vjp that keeps its graph per batch element (differentiating its cotangents
        too): the gradients, and the record of the levels they made."""
        sig = p.sig
        levels: list[Residual] = []

        def run(idxs: list[Index]) -> list[Any]:
            given = [None if c is None else np.asarray(_at(c, idxs[0])) for c in cts]
            found, level = self.vjp_kept(record.residual(record.index(idxs[0])),
                                         pytree.unflatten(sig.out_def, given), numpy_leaf,
                                         requires_grad=_flags(c for c in given if c is not None))
            levels.append(level)
            return pick(sig.in_def.grads(found), p.g_mask)

        grads = _grouped(batch, _each, run, pick(sig.in_types, p.g_mask))
        return grads, _Record(batch, False, [], levels, p.up().mask)

    def _vjp_merged(self, p: Params, record: _Record, cts: list[Any]) -> list[Any]:
        """The Vjp of one merged call: cotangents merged into axis 0, gradients split."""
        sig = p.sig
        batch = record.batch
        n = int(np.prod(batch))
        cotangents = pytree.unflatten(sig.out_def, [
            None if c is None else np.broadcast_to(c, batch + t.shape).reshape(
                (n * t.shape[0], *t.shape[1:]))
            for c, t in zip(cts, sig.out_types)])
        grads = sig.in_def.grads(self.vjp(record.residual(0), cotangents, numpy_leaf))
        return [None if g is None else np.asarray(g).reshape(batch + t.shape)
                for g, t in zip(pick(grads, p.g_mask), pick(sig.in_types, p.g_mask))]

    def _plan(self, sig: Signature, arrays: list[Any], batch: tuple[int, ...],
              mask: tuple[bool, ...] | None, *, merge: bool) -> _Record:
        """The remote calls for one forward (``merge``: a batch may go as one call), not
        yet sent; ``mask`` flags the leaves to differentiate."""
        n_inputs = len(arrays) - sig.in_def.n_params
        k = len(batch)
        if int(np.prod(batch)) == 1:   # no vmap, or a batch of one: one plain call
            arrays = [a.reshape(t.shape) for a, t in zip(arrays, sig.in_types)]
            batch, merged = (), False
        else:
            merged = merge and mergeable(
                self.batchable, [len(t.shape) for t in sig.in_types[:n_inputs]],
                any(any(d != 1 for d in a.shape[:k]) for a in arrays[n_inputs:]),
                bool(mask and any(mask[n_inputs:])))
        flags = mask if mask is not None else tuple(
            prims.differentiable(t) and not (merged and i >= n_inputs)
            for i, t in enumerate(sig.in_types))

        def call(leaves: Sequence[Any]) -> Call:
            return self.make_call(sig.in_def, leaves, flags)

        if not batch:
            return _Record((), False, [call(arrays)], mask=flags)
        full = [np.broadcast_to(a, batch + a.shape[k:]) for a in arrays]
        if merged:
            n = int(np.prod(batch))
            leaves = ([a.reshape((n * a.shape[k], *a.shape[k + 1:])) for a in full[:n_inputs]]
                      + [a.reshape(a.shape[k:]) for a in arrays[n_inputs:]])
            return _Record(batch, True, [call(leaves)], mask=flags)
        return _Record(batch, False, [call([np.ascontiguousarray(a[idx]) for a in full])
                                      for idx in np.ndindex(*batch)], mask=flags)


def _below(residual: Residual) -> Residual:
    """The residual a kept Vjp made ``residual`` from (one that recomputes, if not held)."""
    if residual.below is not None:
        return residual.below
    return Residual(residual.call, levels=residual.levels[:-1])


def _flags(arrays: Iterable[Any]) -> Callable[[Any], bool]:
    """A ``requires_grad`` flagging exactly ``arrays``."""
    ids = {id(a) for a in arrays}
    return lambda a: id(a) in ids


def _sum(total: list[Any], terms: Sequence[Any]) -> list[Any]:
    """``total`` plus ``terms``, elementwise, where None is zero."""
    return [t if s is None else s if t is None else s + np.asarray(t)
            for s, t in zip(total, terms)]


def _each(idx: Index) -> Index:
    """A group key putting every batch element in a group of its own."""
    return idx


def _key(idx: Index, shape: tuple[int, ...]) -> Index:
    return tuple(i if s > 1 else 0 for i, s in zip(idx, shape))


def _at(a: Any, idx: Index) -> Any:
    """Element ``idx`` of ``a``'s leading batch axes (those of size one broadcast)."""
    return a[tuple(i if s > 1 else 0 for i, s in zip(idx, a.shape))]


def _gather(a: Any, idxs: list[Index], batch: tuple[int, ...], t: TensorType) -> Any:
    """The elements ``idxs`` of ``a``: stacked along a new axis 0, or alone if one."""
    if len(idxs) == 1:
        return np.asarray(_at(a, idxs[0]))
    if len(idxs) == int(np.prod(batch)):
        return np.broadcast_to(a, batch + t.shape).reshape((len(idxs), *t.shape))
    return np.stack([_at(a, idx) for idx in idxs])


def _gathered(arrays: Sequence[Any], types: Sequence[TensorType], idxs: list[Index],
              batch: tuple[int, ...]) -> list[Any]:
    """``_gather`` of each of ``arrays`` (None where absent)."""
    return [None if a is None else _gather(a, idxs, batch, t) for a, t in zip(arrays, types)]


def _grouped(batch: tuple[int, ...], key: Callable[[Index], Hashable],
             run: Callable[[list[Index]], list[Any]], types: list[TensorType]) -> list[Any]:
    """Run ``run`` once per group of batch elements sharing ``key``: it returns, per result,
    the group's values stacked along axis 0 (alone if one; None for zeros). The results,
    with the batch axes in front."""
    groups: dict[Hashable, list[Index]] = {}
    for idx in np.ndindex(*batch):
        groups.setdefault(key(idx), []).append(idx)
    if len(groups) == 1:   # in row-major order: a reshape puts every element in place
        found = run(next(iter(groups.values())))
        return [np.zeros(batch + t.shape, numpy_dtype(t)) if f is None
                else np.asarray(f).reshape(batch + t.shape) for f, t in zip(found, types)]
    out = [np.zeros(batch + t.shape, numpy_dtype(t)) for t in types]
    for idxs in groups.values():
        for o, f in zip(out, run(idxs)):
            if f is not None:
                values = np.asarray(f)
                for j, idx in enumerate(idxs):
                    o[idx] = values if len(idxs) == 1 else values[j]
    return out


def _conj(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Between JAX's complex convention and the wire's (torch's); real arrays pass as they are."""
    return np.conj(a) if np.iscomplexobj(a) else a


def _conj_all(arrays: list[Any]) -> list[Any]:
    return [None if a is None else _conj(np.asarray(a)) for a in arrays]


def _unbatch_outputs(sig: Signature, results: list[Any], batch: tuple[int, ...],
                     record: _Record) -> list[Any]:
    flats = [pytree.flatten_up_to(sig.out_def, r) for r in results]
    if not record.batch or record.merged:
        return [np.asarray(o).reshape(batch + t.shape) for o, t in zip(flats[0], sig.out_types)]
    return [np.stack([np.asarray(f[i]) for f in flats]).reshape(batch + t.shape)
            for i, t in enumerate(sig.out_types)]
