"""JAX endpoints: ``fn(*args, **kwargs)``, or ``fn(params, *args, **kwargs)`` with ``params``.

Each distinct call structure (the pytree of inputs with its static values, and
which leaves are differentiated) gets jitted functions once, kept in an LRU
cache; ``jax.jit`` then caches per shape. Forward with ``need_vjp`` runs
``jax.vjp`` under jit and keeps the vjp closure as the residual; Vjp applies
it (vmapped for batched cotangents), also under jit. Checks and messages are
``Endpoint``'s.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from gradserve.errors import DERIVATIVE_UNSUPPORTED, StatusError
from gradserve.frameworks.numpy import ADAPTER as NUMPY
from gradserve.lru import LRU
from gradserve.server.endpoint import CERTAINLY, NO, PLAUSIBLY, Endpoint, Forwarded, Residual, \
    module_roots, own_doc, signature_of
from gradserve.wire import dtypes, pytree
from gradserve.wire.codec import Arguments
from gradserve.wire.memory import WireTensor
from gradserve.wire.specs import TensorSpec, TensorType

#: Compiled call signatures (structure, differentiated leaves, shapes and dtypes) kept per
#: endpoint; each costs a compilation and its executables' memory.
COMPILE_CACHE_SIZE = 64

_Key = tuple[pytree.TreeDef, tuple[bool, ...], tuple[TensorType, ...]]
_WIDE = {dtypes.code_of(n) for n in ("float64", "complex128", "int64")}


class _Leaf:
    """An input array from the wire and whether to differentiate with respect to it."""

    __slots__ = ("value", "requires_grad")

    def __init__(self, value: np.ndarray[Any, Any], requires_grad: bool):
        self.value = value
        self.requires_grad = requires_grad


def _is_input_leaf(x: Any) -> bool:
    return isinstance(x, (_Leaf, jax.Array, np.ndarray, TensorType))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


@dataclass
class _Compiled:
    """Jitted functions for one call structure."""

    forward: Callable[[list[Any], list[Any]], Any]
    forward_vjp: Callable[[list[Any], list[Any]], Any]
    backward: Callable[[Any, Any], Any]
    backward_batched: Callable[[Any, Any], Any]


@dataclass
class _State:
    """A forward's (or kept Vjp's) vjp closure, the call structure it came from, and the
    jitted functions (held here: the cache may have let them go by the time the backward
    comes; None for a kept Vjp's, which run eagerly). ``fn`` is the call as a function of
    its differentiated leaves ``diff``, and ``tree`` its inputs as received: a kept Vjp
    differentiates ``fn`` again."""

    vjp_fn: Any
    in_def: pytree.TreeDef
    mask: tuple[bool, ...]
    compiled: _Compiled | None
    fn: Callable[[list[Any]], Any]
    diff: list[Any]
    tree: Any


class JaxEndpoint(Endpoint):
    """Serve a JAX function.

    With ``params`` (any pytree of arrays in dicts, lists and tuples), the
    function is called as ``fn(params, *args, **kwargs)`` — the stax / Flax /
    Equinox "apply" convention — with the server's params, unless a client
    sends its own (and then gets their gradient back). ``inputs``,
    ``outputs`` and ``batchable`` are as for ``TorchEndpoint``. ``device``
    is ``"cpu"``, ``"gpu"`` or ``"gpu:N"`` (``"cuda"`` works too); default,
    JAX's default device. The jitted functions of the ``compile_cache`` most
    recently used call signatures (structure, static values, differentiated
    leaves, shapes and dtypes) are kept; ``compiles`` counts those ever made.
    """

    framework = "jax"
    reverse_order = 0
    forward_mode = True
    pad_batches = True

    def __init__(self, fn: Callable[..., Any], *, params: Any = None, device: str | None = None,
                 inputs: dict[str, TensorSpec] | None = None,
                 outputs: dict[str, TensorSpec] | None = None, doc: str | None = None,
                 batchable: bool = False, debug: bool = False,
                 compile_cache: int = COMPILE_CACHE_SIZE):
        if not callable(fn):
            raise TypeError(f"a JAX endpoint needs a callable, got {type(fn).__name__}")
        self.device = _device(device)
        self.fn = fn
        self.has_params = params is not None
        self.params = jax.device_put(params, self.device) if self.has_params else None
        self._shared = {_buffer(x) for x in jax.tree_util.tree_leaves(self.params)}
        leaves, _ = pytree.flatten(self.params, _is_array) if self.has_params else ([], None)
        self._accepts_parameters = bool(leaves)
        if self.has_params:
            if len(leaves) != len(jax.tree_util.tree_leaves(self.params)):
                raise TypeError("params must be a pytree of arrays in dicts, lists and tuples "
                                "(for an Equinox module, serve eqx.partition's array part)")
        signature = signature_of(fn)
        if self.has_params:
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        self.call_signature = signature
        self.input_specs = dict(inputs or {})
        self.output_specs = dict(outputs or {})
        self.doc = doc if doc is not None else own_doc(fn, ("jax.",))
        self.batchable = batchable
        self.debug = debug
        self._compiled: LRU[_Key, _Compiled] = LRU(compile_cache)
        self.compiles = 0

    # -- description -------------------------------------------------------
    def parameters(self) -> Any:
        return self.params if self.has_params else {}

    def is_array(self, x: Any) -> bool:
        return _is_array(x)

    def accepts_parameters(self) -> bool:
        return self._accepts_parameters

    def leaf_type(self, x: Any) -> TensorType | None:
        if isinstance(x, _Leaf):
            x = x.value
        if isinstance(x, TensorType):
            return x
        if _is_array(x):
            return TensorType(tuple(x.shape), np.dtype(x.dtype).name)
        return None

    def refuse_dtype(self, code: int) -> str:
        if code in _WIDE and jax.dtypes.canonicalize_dtype(np.float64) != np.float64:
            return (f"{dtypes.name_of(code)} input, but this server's JAX runs without 64-bit "
                    "types (start it with JAX_ENABLE_X64=1)")
        return ""

    # -- array operations --------------------------------------------------
    def to_array(self, wire: WireTensor) -> _Leaf:
        return _Leaf(NUMPY.from_wire(wire), wire.requires_grad)

    def run_forward(self, inputs: Arguments, need_vjp: bool) -> Forwarded:
        leaves, in_def, mask = self._flatten(inputs)
        key = self._key(in_def, mask, leaves)
        compiled = self._compile(key)
        arrays = jax.device_put([leaf.value if isinstance(leaf, _Leaf) else leaf
                                 for leaf in leaves], self.device)
        diff = [a for a, m in zip(arrays, mask) if m]
        rest = [a for a, m in zip(arrays, mask) if not m]
        if not (need_vjp and diff):
            return Forwarded(self.run(lambda: compiled.forward(diff, rest)))
        outputs, vjp_fn = self.run(lambda: compiled.forward_vjp(diff, rest))
        state = _State(vjp_fn, in_def, mask, compiled, lambda d: compiled.forward(d, rest),
                       diff, inputs.tree)
        return Forwarded(outputs, Residual(outputs, state),
                         self._residual_bytes((vjp_fn, outputs, arrays)))

    def run_vjp(self, residual: Residual, cotangents: list[Any], batched: bool) -> Arguments:
        state: _State = residual.state
        ct_tree = self._cotangent_tree(residual.outputs, cotangents, batched)
        if state.compiled is not None:
            apply = state.compiled.backward_batched if batched else state.compiled.backward
        else:
            apply = _backward_batched if batched else _backward
        (grads,) = self.run(lambda: apply(state.vjp_fn, ct_tree))
        return self.mirror(state.in_def, state.mask, grads)

    def run_jvp(self, inputs: Arguments, tangents: list[Any], batched: bool) -> tuple[Any, Any]:
        leaves, in_def, _ = self._flatten(inputs)   # the endpoint's own params come last
        mask = tuple(i < len(tangents) and tangents[i] is not None for i in range(len(leaves)))
        call = self._call(in_def, mask)
        values = [leaf.value if isinstance(leaf, _Leaf) else leaf for leaf in leaves]
        diff = jax.device_put([v for v, m in zip(values, mask) if m], self.device)
        rest = jax.device_put([v for v, m in zip(values, mask) if not m], self.device)
        given = jax.device_put([t.value for t in tangents if t is not None], self.device)

        def f(d: list[Any]) -> Any:
            return call(d, rest)

        def jvp(t: list[Any]) -> tuple[Any, Any]:
            out, out_t = jax.jvp(f, (diff,), (t,))
            return out, out_t

        # a batch of tangents: the outputs are computed once
        outputs, out_tangents = self.run(
            lambda: jax.vmap(jvp, out_axes=(None, 0))(given) if batched else jvp(given))
        return outputs, pytree.map_leaves(
            lambda t: None if t.dtype == jax.dtypes.float0 else t, out_tangents, _is_array)

    def run_vjp_kept(self, residual: Residual, cotangents: list[Any], tree: Any,
                     batched: bool) -> Forwarded:
        if batched:
            raise StatusError(grpc.StatusCode.UNIMPLEMENTED,
                              f"endpoint {self.name!r} (jax) keeps the graph of a Vjp with one "
                              "set of cotangents, not a batch of them", DERIVATIVE_UNSUPPORTED)
        state: _State = residual.state
        out_def = pytree.flatten(residual.outputs, _is_array)[1]
        fixed = jax.device_put(self._cotangent_values(residual.outputs, cotangents, None),
                               self.device)
        flagged = [c is not None and c.requires_grad for c in cotangents]
        n, sent = len(state.diff), state.tree[2] is not None

        def grads_of(primal: list[Any]) -> Any:
            it = iter(primal[n:])
            cts = [next(it) if f else c for c, f in zip(fixed, flagged)]
            _, pull = jax.vjp(state.fn, primal[:n])
            (grads,) = _backward(pull, pytree.unflatten(out_def, cts))
            args, kwargs, params = self.mirror(state.in_def, state.mask, grads).tree
            # the call's static arguments (a name, an axis) are no JAX values: None there
            return _arrays_only((args, kwargs, params if sent else None))

        primal = [*state.diff, *(c for c, f in zip(fixed, flagged) if f)]
        outputs, vjp_fn = self.run(lambda: jax.vjp(grads_of, primal))
        kept_tree = self.kept_inputs(state.tree, tree)
        leaves, in_def = pytree.flatten(kept_tree, _is_input_leaf)
        # this call's inputs are differentiated as they were; a flagged cotangent of an
        # output it does not have (the gradient of an input it did not differentiate) is not
        used = {id(c) for c, f in zip(cotangents, flagged) if f}
        n_inputs = len(pytree.flatten(state.tree, _is_input_leaf)[0])
        mask = state.mask[:n_inputs] + tuple(isinstance(leaf, _Leaf) and id(leaf) in used
                                             for leaf in leaves[n_inputs:])
        kept = _State(vjp_fn, in_def, mask, None, grads_of, primal, kept_tree)
        return Forwarded(outputs, Residual(outputs, kept),
                         self._residual_bytes((vjp_fn, outputs, primal)))

    def _cotangent_tree(self, outputs: Any, cotangents: list[Any], batched: bool) -> Any:
        """The cotangents as JAX wants them: one per output array (zeros where none was
        given, float0 for integer outputs), in the outputs' structure, on the device."""
        out_def = pytree.flatten(outputs, _is_array)[1]
        given = [c.value for c in cotangents if c is not None]
        size = given[0].shape[0] if batched and given else None
        cts = self._cotangent_values(outputs, cotangents, size)
        return pytree.unflatten(out_def, jax.device_put(cts, self.device))

    def _cotangent_values(self, outputs: Any, cotangents: list[Any],
                          batch: int | None) -> list[Any]:
        return [self._cotangent(out, cot, batch)
                for out, cot in zip(pytree.flatten(outputs, _is_array)[0], cotangents)]

    def concat(self, parts: Sequence[Any], axis: int = 0) -> _Leaf:
        values = [p.value if isinstance(p, _Leaf) else np.asarray(p) for p in parts]
        return _Leaf(np.concatenate(values, axis),
                     any(isinstance(p, _Leaf) and p.requires_grad for p in parts))

    def zeros(self, shape: tuple[int, ...], like: Any) -> _Leaf:
        dtype = like.value.dtype if isinstance(like, _Leaf) else like.dtype
        return _Leaf(np.zeros(shape, dtype), False)

    def run_signature(self, inputs: Arguments) -> Any:
        leaves, in_def, mask = self._flatten(inputs)
        call = self._call(in_def, tuple(False for _ in mask))   # traced once: no jit, no cache
        shapes = []
        for leaf in leaves:
            t = self.leaf_type(leaf)
            assert t is not None
            shapes.append(jax.ShapeDtypeStruct(t.shape, dtypes.numpy_dtype(dtypes.code_of(t.dtype))))
        outputs = self.run(lambda: jax.eval_shape(call, [], shapes))
        return pytree.map_leaves(lambda s: TensorType(tuple(s.shape), np.dtype(s.dtype).name),
                                 outputs, lambda x: isinstance(x, jax.ShapeDtypeStruct))

    # -- helpers -----------------------------------------------------------
    def _residual_bytes(self, tree: Any) -> int:
        """Distinct device buffers in ``tree``, less the endpoint's own params."""
        seen: dict[Any, int] = {}
        for x in jax.tree_util.tree_leaves(tree):
            if isinstance(x, jax.Array) and _buffer(x) not in self._shared:
                seen[_buffer(x)] = x.nbytes
        return sum(seen.values())

    def _flatten(self, inputs: Arguments) -> tuple[list[Any], pytree.TreeDef, tuple[bool, ...]]:
        args, kwargs, parameters = inputs.tree
        params = parameters if parameters is not None else self.params
        leaves, in_def = pytree.flatten((args, kwargs, params), _is_input_leaf)
        mask = tuple(isinstance(leaf, _Leaf) and leaf.requires_grad for leaf in leaves)
        return leaves, in_def, mask

    @staticmethod
    def _cotangent(out: Any, cot: _Leaf | None, batch: int | None) -> Any:
        shape = tuple(out.shape) if batch is None else (batch, *out.shape)
        if jnp.issubdtype(out.dtype, np.inexact):
            return np.zeros(shape, out.dtype) if cot is None else cot.value
        return np.zeros(shape, jax.dtypes.float0)

    @property
    def cached(self) -> int:
        """Compiled call signatures held now."""
        return len(self._compiled)

    def _key(self, in_def: pytree.TreeDef, mask: tuple[bool, ...], leaves: list[Any]) -> _Key:
        types = []
        for leaf in leaves:
            t = self.leaf_type(leaf)
            assert t is not None
            types.append(t)
        return in_def, mask, tuple(types)

    def _compile(self, key: _Key) -> _Compiled:
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        in_def, mask, _ = key
        self.compiles += 1
        call = self._call(in_def, mask)
        compiled = _Compiled(
            forward=jax.jit(call),
            forward_vjp=jax.jit(lambda diff, rest: jax.vjp(lambda d: call(d, rest), diff)),
            backward=jax.jit(_backward), backward_batched=jax.jit(_backward_batched))
        self._compiled.put(key, compiled)
        return compiled

    def _call(self, in_def: pytree.TreeDef,
              mask: tuple[bool, ...]) -> Callable[[list[Any], list[Any]], Any]:
        """The user's function as ``call(diff, rest)``: the leaves of one call structure, split
        by ``mask`` into those differentiated and the others."""
        fn, has_params = self.fn, self.has_params

        def call(diff: list[Any], rest: list[Any]) -> Any:
            d, r = iter(diff), iter(rest)
            args, kwargs, params = pytree.unflatten(in_def, [next(d) if m else next(r)
                                                             for m in mask])
            out = fn(params, *args, **kwargs) if has_params else fn(*args, **kwargs)
            return pytree.map_leaves(lambda x: x, out, _is_array)  # plain containers

        return call


def _arrays_only(tree: Any) -> Any:
    """``tree`` with None in place of each leaf that is no array (static arguments)."""
    return jax.tree_util.tree_map(lambda x: x if _is_array(x) else None, tree)


def _conj(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.conj(x) if jnp.iscomplexobj(x) else x, tree)


def _torch_convention(vjp_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The wire's complex convention is torch's (conjugate Wirtinger): conj . vjp . conj."""
    return lambda ct: _conj(vjp_fn(_conj(ct)))


def _backward(vjp_fn: Callable[[Any], Any], ct: Any) -> Any:
    """A vjp closure applied to cotangents, in the wire's convention."""
    return _torch_convention(vjp_fn)(ct)


def _backward_batched(vjp_fn: Callable[[Any], Any], cts: Any) -> Any:
    """A vjp closure applied to each of a batch of cotangents, in the wire's convention."""
    return jax.vmap(_torch_convention(vjp_fn))(cts)


def _buffer(x: Any) -> Any:
    try:
        return x.unsafe_buffer_pointer()
    except Exception:  # sharded or deleted arrays: count them by identity
        return id(x)


def _device(name: str | None) -> Any:
    """A jax device from ``cpu``, ``gpu``, ``gpu:1``, ``cuda:0`` (None: the default)."""
    if name is None:
        return jax.devices()[0]
    kind, _, index = str(name).partition(":")
    kind = "gpu" if kind == "cuda" else kind
    try:
        return jax.devices(kind)[int(index or 0)]
    except (RuntimeError, IndexError) as err:
        raise ValueError(f"no JAX device {name!r}: {err}") from None


def claims(obj: Any) -> int:
    """How surely ``obj`` is a JAX function (``CERTAINLY`` for jitted ones)."""
    if type(obj).__module__.startswith(("jax", "jaxlib")):
        return CERTAINLY
    wrapped = inspect.unwrap(obj) if callable(obj) else obj
    return PLAUSIBLY if "jax" in module_roots(wrapped) else NO


def build(obj: Any, device: Any = None, **options: Any) -> JaxEndpoint:
    """A ``JaxEndpoint`` serving ``obj``."""
    return JaxEndpoint(obj, device=device, **options)
