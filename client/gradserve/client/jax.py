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
outputs and gradients then live in the reply arena, whose slot stays in use
as long as the ``jax.Array`` does. Traced calls (``jit``, ``vmap``, grad of
grad) keep the callback, which copies.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradserve import dtypes, pytree
from gradserve.client.core import Call, Client, Residual
from gradserve.errors import GradserveError
import gradserve.frameworks.jax  # noqa: F401  (registers jax arrays with the codec)
from gradserve.frameworks.numpy import ADAPTER as NUMPY
from gradserve.specs import TensorSpec
from gradserve.transport.arena import ALIGN   # also JAX's CPU DLPack import alignment

#: Forward residuals awaiting their backward (older ones are released; each backward
#: consumes its own, and a second backward of the same forward recomputes).
RESIDUALS_KEPT = 256
TOKEN = jax.ShapeDtypeStruct((), np.int32)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _numpy_leaf(wire: Any, path: str) -> np.ndarray:
    return NUMPY.from_wire(wire)


def _numpy_dtype(spec: TensorSpec) -> np.dtype:
    return dtypes.numpy_dtype(dtypes.code_of(spec.dtype))


def _shape_dtype(spec: TensorSpec) -> jax.ShapeDtypeStruct:
    """The JAX view of a spec: 64-bit types narrow to 32 bits unless x64 is on, as in JAX."""
    return jax.ShapeDtypeStruct(spec.shape, jax.dtypes.canonicalize_dtype(_numpy_dtype(spec)))


def _differentiable(spec: TensorSpec) -> bool:
    return dtypes.code_of(spec.dtype) in dtypes.DIFFERENTIABLE


@dataclass
class _Signature:
    """One input signature's output structure and the custom_vjp function for it."""

    in_def: pytree.TreeDef
    in_specs: tuple[TensorSpec, ...]
    out_def: pytree.TreeDef
    out_specs: tuple[TensorSpec, ...]
    n_params: int
    function: Any = None


@dataclass
class _Record:
    """What one forward callback sent: the batch shape, and a residual per remote call."""

    batch: tuple[int, ...]
    merged: bool
    residuals: list[Residual]


class RemoteJaxFunction:
    """A remote endpoint called on ``jax.Array`` pytrees, differentiable with JAX.

    ``f(*args, **kwargs)`` uses the server's parameters; ``f.apply(params,
    *args, **kwargs)`` sends the caller's own (``client.jax_params(name)``
    gives the server's as a starting point) and differentiates them too.
    """

    def __init__(self, client: Client, name: str, *, timeout: float | None = None):
        self.client = client
        self.name = name
        self.timeout = timeout
        self._batchable: bool | None = None
        self._signatures: dict[tuple, _Signature] = {}
        self._records: OrderedDict[int, _Record] = OrderedDict()
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._failure = threading.local()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(args, kwargs, None)

    def apply(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        """Call with client-held ``params`` (a pytree like the endpoint's own)."""
        return self._call(args, kwargs, params)

    @property
    def batchable(self) -> bool:
        if self._batchable is None:
            self._batchable = self.client.describe(self.name, timeout=self.timeout).batchable
        return self._batchable

    def _call(self, args: tuple, kwargs: dict, params: Any) -> Any:
        leaves, in_def = pytree.flatten((tuple(args), dict(kwargs), params), _is_leaf)
        in_specs = tuple(TensorSpec(tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype).name)
                         for x in leaves)
        sig = self._signature(in_def, in_specs)
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

    def _host(self, body: Any, *args: Any) -> Any:
        """Run a host callback body, remembering a gradserve failure for ``_call``."""
        try:
            return body(*args)
        except GradserveError as err:
            self._failure.error = err
            raise

    # -- trace-time: signatures and the custom_vjp function ----------------
    def _signature(self, in_def: pytree.TreeDef, in_specs: tuple[TensorSpec, ...]) -> _Signature:
        key = (in_def, in_specs)
        sig = self._signatures.get(key)
        if sig is None:
            outputs = self.client.signature(self.name, *pytree.unflatten(in_def, list(in_specs)),
                                            timeout=self.timeout)
            out_specs, out_def = pytree.flatten(outputs, lambda x: isinstance(x, TensorSpec))
            n_params = in_def.children[2].num_leaves
            sig = _Signature(in_def, in_specs, out_def, tuple(out_specs), n_params)
            sig.function = self._build(sig)
            self._signatures[key] = sig
        return sig

    def _build(self, sig: _Signature) -> Any:
        out_shapes = tuple(_shape_dtype(s) for s in sig.out_specs)
        grad_shapes = tuple(_shape_dtype(s) for s in sig.in_specs if _differentiable(s))
        refusal = (f"gradserve: differentiating the gradient of remote endpoint {self.name!r} "
                   "(grad of grad, hessian) is not supported; reverse mode works once")

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
        def remote(*leaves: Any) -> tuple:
            return tuple(forward(None)(*leaves))

        def remote_fwd(*primals: Any) -> tuple:
            mask = tuple(bool(p.perturbed) for p in primals)
            leaves = tuple(p.value for p in primals)
            *outs, token = forward(mask)(*leaves)
            return tuple(outs), (leaves, token)

        def remote_bwd(residual: tuple, cts: tuple) -> tuple:
            leaves, token = residual
            ct_mask = tuple(_differentiable(spec) and not _is_symbolic_zero(ct)
                            for spec, ct in zip(sig.out_specs, cts))
            grads = iter(backward(ct_mask)(token, leaves, [ct for ct, m in zip(cts, ct_mask) if m]))
            return tuple(next(grads) if _differentiable(s) else None for s in sig.in_specs)

        remote.defvjp(remote_fwd, remote_bwd, symbolic_zeros=True)
        return remote

    # -- run-time: the host callbacks --------------------------------------
    def _host_forward(self, sig: _Signature, mask: tuple[bool, ...] | None, *arrays: Any) -> tuple:
        arrays = [np.asarray(a) for a in arrays]
        batch = _batch_shape(arrays, sig.in_specs)
        need_vjp = mask is not None and any(mask)
        record = self._plan(sig, arrays, batch, mask if need_vjp else None)
        results = [self.client.call_forward(res.call, _numpy_leaf, need_vjp=need_vjp,
                                            timeout=self.timeout) for res in record.residuals]
        outs = [o.astype(_shape_dtype(s).dtype, copy=False)
                for o, s in zip(_unbatch_outputs(sig, [r[0] for r in results], batch, record),
                                sig.out_specs)]
        if mask is None:
            return tuple(outs)
        token = np.int32(0)
        if need_vjp:
            record.residuals = [r[1] for r in results]
            token = np.int32(next(self._tokens) % (2**31 - 1) + 1)
            self._remember(int(token), record)
        return (*outs, np.broadcast_to(token, batch))

    def _host_backward(self, sig: _Signature, ct_mask: tuple[bool, ...], token: Any,
                       leaves: tuple, cts: list) -> tuple:
        it = iter(cts)
        # in the server's dtype and the wire's complex convention (torch's: conj of JAX's)
        full_cts = [_conj(np.asarray(next(it), _numpy_dtype(s))) if m else None
                    for m, s in zip(ct_mask, sig.out_specs)]
        given = [(c, s) for c, s in zip(full_cts, sig.out_specs) if c is not None]
        batch = _batch_shape([*leaves, *(c for c, _ in given)],
                             [*sig.in_specs, *(s for _, s in given)])
        with self._lock:  # consumed: its residuals are released once this backward is done
            record = self._records.pop(int(np.asarray(token).reshape(-1)[0]), None)
        if record is None:  # forward elided, duplicated or forgotten: recompute from the inputs
            leaves = [np.asarray(a) for a in leaves]   # only now: a copy for large inputs
            record = self._plan(sig, leaves, _batch_shape(leaves, sig.in_specs), None)
        if not record.batch:  # one forward: plain, or batched cotangents (jacrev, vmap of vjp)
            n = int(np.prod(batch))
            lead = (n,) if n > 1 else ()
            cotangents = pytree.unflatten(sig.out_def, [
                None if c is None else np.broadcast_to(c, batch + s.shape).reshape(lead + s.shape)
                for c, s in zip(full_cts, sig.out_specs)])
            grads = self.client.call_vjp(record.residuals[0], cotangents, _numpy_leaf,
                                         batched=n > 1, timeout=self.timeout)
            flats = [pytree.flatten_up_to(sig.in_def, (grads.args, grads.kwargs, grads.parameters))]
            return _unbatch_grads(sig, flats, batch, merged=True)
        per_call = _batch_cotangents(sig, full_cts, record)
        grads = [self.client.call_vjp(res, ct, _numpy_leaf, timeout=self.timeout)
                 for res, ct in zip(record.residuals, per_call)]
        flats = [pytree.flatten_up_to(sig.in_def, (g.args, g.kwargs, g.parameters)) for g in grads]
        return _unbatch_grads(sig, flats, record.batch, record.merged)

    def _plan(self, sig: _Signature, arrays: list, batch: tuple,
              mask: tuple[bool, ...] | None) -> _Record:
        """The remote calls for one forward, as residuals not yet sent (id "")."""
        n_inputs = len(arrays) - sig.n_params
        k = len(batch)
        if int(np.prod(batch)) == 1:   # no vmap, or a batch of one: one plain call
            arrays = [a.reshape(s.shape) for a, s in zip(arrays, sig.in_specs)]
            batch, merged = (), False
        else:
            merged = (self.batchable and all(len(s.shape) >= 1 for s in sig.in_specs[:n_inputs])
                      and all(all(d == 1 for d in a.shape[:k]) for a in arrays[n_inputs:])
                      and not (mask and any(mask[n_inputs:])))
        flags = mask if mask is not None else tuple(
            _differentiable(s) and not (merged and i >= n_inputs) for i, s in enumerate(sig.in_specs))

        def residual(leaves: list) -> Residual:
            flagged = {id(x) for x, f in zip(leaves, flags) if f}
            args, kwargs, params = pytree.unflatten(sig.in_def, leaves)
            call = Call(self.name, args, kwargs, params, lambda x: id(x) in flagged)
            return Residual(call, "", self.client._released)

        if not batch:
            return _Record((), False, [residual(arrays)])
        full = [np.broadcast_to(a, batch + a.shape[k:]) for a in arrays]
        if merged:
            n = int(np.prod(batch))
            leaves = ([a.reshape((n * a.shape[k], *a.shape[k + 1:])) for a in full[:n_inputs]]
                      + [a.reshape(a.shape[k:]) for a in arrays[n_inputs:]])
            return _Record(batch, True, [residual(leaves)])
        return _Record(batch, False, [residual([np.ascontiguousarray(a[idx]) for a in full])
                                      for idx in np.ndindex(batch)])

    def _remember(self, token: int, record: _Record) -> None:
        with self._lock:
            self._records[token] = record
            while len(self._records) > RESIDUALS_KEPT:
                self._records.popitem(last=False)  # its residuals are released on collection


def _callback(host: Any, shapes: Any, refusal: str) -> Any:
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


def as_jax(array: np.ndarray, device: jax.Device | None = None) -> jax.Array:
    """``array`` as a ``jax.Array`` on ``device`` (None: the default device).

    On CPU a writable, contiguous, 64-byte-aligned array of a dtype DLPack carries
    is aliased, not copied, and kept alive as long as the result is (which is then
    committed to its device, as DLPack imports are); anything else is copied.
    """
    platform = device.platform if device is not None else jax.default_backend()
    if (platform == "cpu" and array.size and array.flags.writeable
            and array.flags.c_contiguous and array.ctypes.data % ALIGN == 0):
        try:
            return jax.dlpack.from_dlpack(array, device, copy=False)
        except (BufferError, ValueError):   # a dtype DLPack lacks, another CPU device
            pass
    return jnp.asarray(array) if device is None else jax.device_put(array, device)


def _conj(a: np.ndarray) -> np.ndarray:
    """Between JAX's complex convention and the wire's (torch's); real arrays pass as they are."""
    return np.conj(a) if np.iscomplexobj(a) else a


def _is_symbolic_zero(x: Any) -> bool:
    return type(x).__name__ == "SymbolicZero"


def _batch_shape(arrays: list, specs: list | tuple) -> tuple[int, ...]:
    """The vmap batch axes in front of every array (``expand_dims`` puts them there)."""
    if not arrays:
        return ()
    k = arrays[0].ndim - len(specs[0].shape)
    if k <= 0:
        return ()
    return tuple(np.broadcast_shapes(*(a.shape[:k] for a in arrays)))


def _unbatch_outputs(sig: _Signature, results: list, batch: tuple, record: _Record) -> list:
    flats = [pytree.flatten_up_to(sig.out_def, r) for r in results]
    if not record.batch or record.merged:
        return [np.asarray(o).reshape(batch + s.shape) for o, s in zip(flats[0], sig.out_specs)]
    return [np.stack([np.asarray(f[i]) for f in flats]).reshape(batch + s.shape)
            for i, s in enumerate(sig.out_specs)]


def _batch_cotangents(sig: _Signature, cts: list, record: _Record) -> list:
    """Cotangent trees, one per remote call of a batched ``record``."""
    batch = record.batch
    full = [None if c is None else np.broadcast_to(c, batch + s.shape)
            for c, s in zip(cts, sig.out_specs)]
    if record.merged:
        n = int(np.prod(batch))
        return [pytree.unflatten(sig.out_def, [
            None if c is None else c.reshape((n * s.shape[0], *s.shape[1:]))
            for c, s in zip(full, sig.out_specs)])]
    return [pytree.unflatten(sig.out_def, [None if c is None else np.ascontiguousarray(c[idx])
                                           for c in full])
            for idx in np.ndindex(batch)]


def _unbatch_grads(sig: _Signature, flats: list, batch: tuple, merged: bool) -> tuple:
    """Gradients of the differentiable inputs with the batch axes in front (zeros for None)."""
    out = []
    for i, spec in enumerate(sig.in_specs):
        if not _differentiable(spec):
            continue
        dtype = _numpy_dtype(spec)
        parts = [f[i] for f in flats]
        if any(p is None for p in parts):
            out.append(np.zeros(batch + spec.shape, dtype))
        elif merged:
            out.append(_conj(np.asarray(parts[0], dtype)).reshape(batch + spec.shape))
        else:
            out.append(_conj(np.stack([np.asarray(p, dtype) for p in parts]))
                       .reshape(batch + spec.shape))
    return tuple(out)
