"""Remote endpoints as JAX functions: ``jax.custom_vjp`` around host callbacks.

``RemoteJaxFunction`` works under ``jax.grad``/``vjp``/``value_and_grad``,
``jax.jit`` and ``jax.vmap``. Output shapes come from the server's
``Signature`` RPC (cached per input signature). The forward callback sends a
Forward and returns the outputs plus a *token* naming the residual it kept;
the backward callback sends a Vjp for that token. JAX may elide or duplicate
callbacks under ``jit(grad(...))``, so the token is only an optimisation: a
backward whose token is unknown re-sends the inputs and the server recomputes.

Under ``vmap`` the callbacks see every argument with the batch axes in front
(``vmap_method="expand_dims"``). A ``batchable`` endpoint then gets one call
with the batch merged into its own axis 0; others get one call per element.
A backward whose cotangents are batched but whose forward was not (``jacrev``,
``vmap`` of a vjp) becomes one Vjp with batched cotangents.

Where the forward or backward runs eagerly (no argument is a tracer, as under
eager ``jax.grad``/``vjp``), it skips the callback and calls the host directly:
its results become ``jax.Array``s through DLPack, which on CPU alias a
64-byte-aligned array without a copy. Over the shared-memory transport the
outputs and gradients then live in the reply regions, whose slot stays in use
as long as the ``jax.Array`` does. Traced calls (``jit``, ``vmap``, grad of
grad) keep the callback, which copies.
"""

from __future__ import annotations

import functools
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import numpy as np

from gradserve.client.calls import Call, Residual
from gradserve.client.core import Client, numpy_leaf
from gradserve.client.remote import CallDef, RemoteEndpoint, flatten_call, higher_order_refusal, \
    mergeable
from gradserve.errors import GradserveError
from gradserve.frameworks.jax import as_jax
from gradserve.lru import LRU
from gradserve.wire import dtypes, pytree
from gradserve.wire.codec import Arguments
from gradserve.wire.specs import TensorType

#: Forward residuals awaiting their backward (older ones are released; each backward
#: consumes its own, and a second backward of the same forward recomputes).
RESIDUALS_KEPT = 256
#: Input signatures whose output structure and custom_vjp function are kept.
SIGNATURES_KEPT = 256
TOKEN = jax.ShapeDtypeStruct((), np.int32)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _numpy_dtype(t: TensorType) -> np.dtype[Any]:
    return dtypes.numpy_dtype(dtypes.code_of(t.dtype))


def _shape_dtype(t: TensorType) -> jax.ShapeDtypeStruct:
    """The JAX view of a type: 64-bit types narrow to 32 bits unless x64 is on, as in JAX."""
    return jax.ShapeDtypeStruct(t.shape, jax.dtypes.canonicalize_dtype(_numpy_dtype(t)))


def _differentiable(t: TensorType) -> bool:
    return dtypes.code_of(t.dtype) in dtypes.DIFFERENTIABLE


@dataclass
class _Signature:
    """One input signature's output structure and the custom_vjp function for it."""

    in_def: CallDef
    in_types: tuple[TensorType, ...]
    out_def: pytree.TreeDef
    out_types: tuple[TensorType, ...]
    function: Any = None


@dataclass
class _Record:
    """What one forward callback sends: the batch shape, and the calls that make it up
    (one, or one per batch element), with their residuals once sent."""

    batch: tuple[int, ...]
    merged: bool
    calls: list[Call]
    residuals: list[Residual] = field(default_factory=list)

    def pending(self) -> list[Residual]:
        """Residuals to differentiate: those kept, else id-less ones that recompute."""
        return self.residuals or [Residual(call) for call in self.calls]


class RemoteJaxFunction(RemoteEndpoint):
    """A remote endpoint called on ``jax.Array`` pytrees, differentiable with JAX.

    ``f(*args, **kwargs)`` uses the server's parameters; ``f.apply(params,
    *args, **kwargs)`` sends the caller's own (``client.jax_params(name)``
    gives the server's as a starting point) and differentiates them too.
    ``residuals_kept`` bounds the forwards whose residual awaits a backward.
    """

    framework = "jax"

    def __init__(self, client: Client, name: str, *, timeout: float | None = None,
                 residuals_kept: int = RESIDUALS_KEPT):
        super().__init__(client, name, timeout=timeout)
        self._signatures: LRU[tuple[Any, ...], _Signature] = LRU(SIGNATURES_KEPT)
        self._records: LRU[int, _Record] = LRU(residuals_kept)
        self._tokens = itertools.count(1)
        self._failure = threading.local()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(Arguments(args, kwargs))

    def apply(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        """Call with client-held ``params`` (a pytree like the endpoint's own)."""
        return self._call(Arguments(args, kwargs, params))

    def _call(self, inputs: Arguments) -> Any:
        leaves, call_def = flatten_call(inputs, _is_leaf)
        in_types = tuple(TensorType(tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype).name)
                         for x in leaves)
        sig = self._signature(call_def, in_types)
        self._failure.error = None
        try:
            out_leaves = sig.function(*leaves)
        except Exception as err:
            # JAX reports a failed callback as its own error type; where the call ran
            # eagerly, give back the gradserve error (under jit its text is in JAX's message;
            # a host called directly raised it itself)
            failure, self._failure.error = self._failure.error, None
            if failure is not None and failure is not err:
                raise failure from err
            raise
        return pytree.unflatten(sig.out_def, list(out_leaves))

    def _host(self, body: Callable[..., Any], *args: Any) -> Any:
        """Run a host callback body, remembering a gradserve failure for ``_call``."""
        try:
            return body(*args)
        except GradserveError as err:
            self._failure.error = err
            raise

    # -- trace-time: signatures and the custom_vjp function ----------------
    def _signature(self, call_def: CallDef, in_types: tuple[TensorType, ...]) -> _Signature:
        key = (call_def.treedef, in_types)
        sig = self._signatures.get(key)
        if sig is None:
            parts = call_def.unflatten(in_types)
            outputs = self.client.signature(self.name, parts.args, parts.kwargs, parts.parameters,
                                            timeout=self.timeout)
            out_types, out_def = pytree.flatten(outputs, lambda x: isinstance(x, TensorType))
            sig = _Signature(call_def, in_types, out_def, tuple(out_types))
            sig.function = self._build(sig)
            self._signatures.put(key, sig)
        return sig

    def _build(self, sig: _Signature) -> Any:
        out_shapes = tuple(_shape_dtype(t) for t in sig.out_types)
        grad_shapes = tuple(_shape_dtype(t) for t in sig.in_types if _differentiable(t))
        refusal = higher_order_refusal(self.name, "the JAX client serves reverse mode once")

        @functools.lru_cache(maxsize=None)
        def forward(mask: tuple[bool, ...] | None) -> Any:
            shapes = out_shapes if mask is None else (*out_shapes, TOKEN)
            return _callback(functools.partial(self._host, self._host_forward, sig, mask), shapes,
                             refusal)

        @functools.lru_cache(maxsize=None)
        def backward(ct_mask: tuple[bool, ...]) -> Any:
            return _callback(functools.partial(self._host, self._host_backward, sig, ct_mask),
                             grad_shapes, refusal)

        @jax.custom_vjp
        def remote(*leaves: Any) -> tuple[Any, ...]:
            return tuple(forward(None)(*leaves))

        def remote_fwd(*primals: Any) -> tuple[Any, ...]:
            mask = tuple(bool(p.perturbed) for p in primals)
            leaves = tuple(p.value for p in primals)
            *outs, token = forward(mask)(*leaves)
            return tuple(outs), (leaves, token)

        def remote_bwd(residual: tuple[Any, ...], cts: tuple[Any, ...]) -> tuple[Any, ...]:
            leaves, token = residual
            ct_mask = tuple(_differentiable(t) and not _is_symbolic_zero(ct)
                            for t, ct in zip(sig.out_types, cts))
            grads = iter(backward(ct_mask)(token, leaves, [ct for ct, m in zip(cts, ct_mask) if m]))
            return tuple(next(grads) if _differentiable(t) else None for t in sig.in_types)

        remote.defvjp(remote_fwd, remote_bwd, symbolic_zeros=True)
        return remote

    # -- run-time: the host callbacks --------------------------------------
    def _host_forward(self, sig: _Signature, mask: tuple[bool, ...] | None,
                      *arrays: Any) -> tuple[Any, ...]:
        arrays_np = [np.asarray(a) for a in arrays]
        batch = _batch_shape(arrays_np, sig.in_types)
        need_vjp = mask is not None and any(mask)
        record = self._plan(sig, arrays_np, batch, mask if need_vjp else None)
        results = [self.forward(call, numpy_leaf, need_vjp=need_vjp) for call in record.calls]
        outs = [o.astype(_shape_dtype(t).dtype, copy=False)
                for o, t in zip(_unbatch_outputs(sig, [r[0] for r in results], batch, record),
                                sig.out_types)]
        if mask is None:
            return tuple(outs)
        token = np.int32(0)
        if need_vjp:
            record.residuals = [r[1] for r in results if r[1] is not None]
            token = np.int32(next(self._tokens) % (2**31 - 1) + 1)
            self._records.put(int(token), record)   # the oldest beyond the bound are released
        return (*outs, np.broadcast_to(token, batch))

    def _host_backward(self, sig: _Signature, ct_mask: tuple[bool, ...], token: Any,
                       leaves: tuple[Any, ...], cts: list[Any]) -> tuple[Any, ...]:
        it = iter(cts)
        # in the server's dtype and the wire's complex convention (torch's: conj of JAX's)
        full_cts = [_conj(np.asarray(next(it), _numpy_dtype(t))) if m else None
                    for m, t in zip(ct_mask, sig.out_types)]
        given = [(c, t) for c, t in zip(full_cts, sig.out_types) if c is not None]
        batch = _batch_shape([*leaves, *(c for c, _ in given)],
                             [*sig.in_types, *(t for _, t in given)])
        # consumed: its residuals are released once this backward is done
        record = self._records.pop(int(np.asarray(token).reshape(-1)[0]))
        if record is None:  # forward elided, duplicated or forgotten: recompute from the inputs
            arrays = [np.asarray(a) for a in leaves]   # only now: a copy for large inputs
            record = self._plan(sig, arrays, _batch_shape(arrays, sig.in_types), None)
        pending = record.pending()
        if not record.batch:  # one forward: plain, or batched cotangents (jacrev, vmap of vjp)
            n = int(np.prod(batch))
            lead = (n,) if n > 1 else ()
            cotangents = pytree.unflatten(sig.out_def, [
                None if c is None else np.broadcast_to(c, batch + t.shape).reshape(lead + t.shape)
                for c, t in zip(full_cts, sig.out_types)])
            grads = self.vjp(pending[0], cotangents, numpy_leaf, batched=n > 1)
            return _unbatch_grads(sig, [sig.in_def.grads(grads)], batch, merged=True)
        per_call = _batch_cotangents(sig, full_cts, record)
        flats = [sig.in_def.grads(self.vjp(res, ct, numpy_leaf))
                 for res, ct in zip(pending, per_call)]
        return _unbatch_grads(sig, flats, record.batch, record.merged)

    def _plan(self, sig: _Signature, arrays: list[Any], batch: tuple[int, ...],
              mask: tuple[bool, ...] | None) -> _Record:
        """The remote calls for one forward, not yet sent."""
        n_inputs = len(arrays) - sig.in_def.n_params
        k = len(batch)
        if int(np.prod(batch)) == 1:   # no vmap, or a batch of one: one plain call
            arrays = [a.reshape(t.shape) for a, t in zip(arrays, sig.in_types)]
            batch, merged = (), False
        else:
            merged = mergeable(self.batchable, [len(t.shape) for t in sig.in_types[:n_inputs]],
                               any(any(d != 1 for d in a.shape[:k]) for a in arrays[n_inputs:]),
                               bool(mask and any(mask[n_inputs:])))
        flags = mask if mask is not None else tuple(
            _differentiable(t) and not (merged and i >= n_inputs)
            for i, t in enumerate(sig.in_types))

        def call(leaves: Sequence[Any]) -> Call:
            return self.make_call(sig.in_def, leaves, flags)

        if not batch:
            return _Record((), False, [call(arrays)])
        full = [np.broadcast_to(a, batch + a.shape[k:]) for a in arrays]
        if merged:
            n = int(np.prod(batch))
            leaves = ([a.reshape((n * a.shape[k], *a.shape[k + 1:])) for a in full[:n_inputs]]
                      + [a.reshape(a.shape[k:]) for a in arrays[n_inputs:]])
            return _Record(batch, True, [call(leaves)])
        return _Record(batch, False, [call([np.ascontiguousarray(a[idx]) for a in full])
                                      for idx in np.ndindex(batch)])


def _callback(host: Callable[..., Any], shapes: Any, refusal: str) -> Callable[..., Any]:
    """A host call: direct on concrete arrays, else a host callback (one call per vmap
    batch) that refuses to be differentiated itself."""
    @jax.custom_jvp
    def traced(*args: Any) -> Any:
        return jax.pure_callback(host, shapes, *args, vmap_method="expand_dims")

    @traced.defjvp
    def _refuse(primals: Any, tangents: Any) -> Any:
        raise NotImplementedError(refusal)

    def run(*args: Any) -> Any:
        leaves = jax.tree_util.tree_leaves(args)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return traced(*args)
        devices = {d for x in leaves if isinstance(x, jax.Array) and x.committed
                   for d in x.devices()}
        if len(devices) > 1:   # where the results belong is for JAX to say
            return traced(*args)
        device = devices.pop() if devices else None
        return tuple(as_jax(np.asarray(out), device) for out in host(*args))

    return run


def _conj(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Between JAX's complex convention and the wire's (torch's); real arrays pass as they are."""
    return np.conj(a) if np.iscomplexobj(a) else a


def _is_symbolic_zero(x: Any) -> bool:
    return type(x).__name__ == "SymbolicZero"


def _batch_shape(arrays: Sequence[Any], types: Sequence[TensorType]) -> tuple[int, ...]:
    """The vmap batch axes in front of every array (``expand_dims`` puts them there)."""
    if not arrays:
        return ()
    k = arrays[0].ndim - len(types[0].shape)
    if k <= 0:
        return ()
    return tuple(np.broadcast_shapes(*(a.shape[:k] for a in arrays)))


def _unbatch_outputs(sig: _Signature, results: list[Any], batch: tuple[int, ...],
                     record: _Record) -> list[Any]:
    flats = [pytree.flatten_up_to(sig.out_def, r) for r in results]
    if not record.batch or record.merged:
        return [np.asarray(o).reshape(batch + t.shape) for o, t in zip(flats[0], sig.out_types)]
    return [np.stack([np.asarray(f[i]) for f in flats]).reshape(batch + t.shape)
            for i, t in enumerate(sig.out_types)]


def _batch_cotangents(sig: _Signature, cts: list[Any], record: _Record) -> list[Any]:
    """Cotangent trees, one per remote call of a batched ``record``."""
    batch = record.batch
    full = [None if c is None else np.broadcast_to(c, batch + t.shape)
            for c, t in zip(cts, sig.out_types)]
    if record.merged:
        n = int(np.prod(batch))
        return [pytree.unflatten(sig.out_def, [
            None if c is None else c.reshape((n * t.shape[0], *t.shape[1:]))
            for c, t in zip(full, sig.out_types)])]
    return [pytree.unflatten(sig.out_def, [None if c is None else np.ascontiguousarray(c[idx])
                                           for c in full])
            for idx in np.ndindex(batch)]


def _unbatch_grads(sig: _Signature, flats: list[list[Any]], batch: tuple[int, ...],
                   merged: bool) -> tuple[Any, ...]:
    """Gradients of the differentiable inputs with the batch axes in front (zeros for None)."""
    out = []
    for i, t in enumerate(sig.in_types):
        if not _differentiable(t):
            continue
        dtype = _numpy_dtype(t)
        parts = [f[i] for f in flats]
        if any(p is None for p in parts):
            out.append(np.zeros(batch + t.shape, dtype))
        elif merged:
            out.append(_conj(np.asarray(parts[0], dtype)).reshape(batch + t.shape))
        else:
            out.append(_conj(np.stack([np.asarray(p, dtype) for p in parts]))
                       .reshape(batch + t.shape))
    return tuple(out)
