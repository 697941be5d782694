"""JAX endpoints: ``fn(*args, **kwargs)``, or ``fn(params, *args, **kwargs)`` with ``params``.

Each distinct call structure (the pytree of inputs with its static values, and
which leaves are differentiated) gets jitted functions once, kept in an LRU
cache; ``jax.jit`` then caches per shape. Forward with ``need_vjp`` runs
``jax.vjp`` under jit and keeps the vjp closure as the residual; Vjp applies
it (vmapped for batched cotangents), also under jit.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gradserve import dtypes, pytree
from gradserve.errors import invalid
from gradserve.frameworks import WireTensor
import gradserve.frameworks.jax  # noqa: F401  (registers jax arrays: outputs are encoded)
from gradserve.frameworks.numpy import ADAPTER as NUMPY
from gradserve.server.registry import Endpoint, own_doc
from gradserve.specs import TensorSpec

#: Call structures whose jitted functions are kept per endpoint.
COMPILE_CACHE_SIZE = 64


class _Leaf:
    """An input array from the wire and whether to differentiate with respect to it."""

    __slots__ = ("value", "requires_grad")

    def __init__(self, value: np.ndarray, requires_grad: bool):
        self.value = value
        self.requires_grad = requires_grad


def _is_input_leaf(x: Any) -> bool:
    return isinstance(x, (_Leaf, jax.Array, np.ndarray, TensorSpec))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


@dataclass
class _Compiled:
    """Jitted functions for one call structure; ``call(diff, rest)`` is the user's function."""

    call: Callable[[list, list], Any]
    forward: Callable[[list, list], Any]
    forward_vjp: Callable[[list, list], Any]
    backward: Callable[[Any, Any], Any]
    backward_batched: Callable[[Any, Any], Any]


@dataclass
class _Residual:
    vjp_fn: Any
    outputs: Any
    in_def: pytree.TreeDef
    mask: tuple[bool, ...]


class JaxEndpoint(Endpoint):
    """Serve a JAX function.

    With ``params`` (any pytree of arrays in dicts, lists and tuples), the
    function is called as ``fn(params, *args, **kwargs)`` — the stax / Flax /
    Equinox "apply" convention — with the server's params, unless a client
    sends its own (and then gets their gradient back). ``inputs``,
    ``outputs`` and ``batchable`` are as for ``TorchEndpoint``. ``device``
    is ``"cpu"``, ``"gpu"`` or ``"gpu:N"`` (``"cuda"`` works too); default,
    JAX's default device.
    """

    framework = "jax"

    def __init__(self, fn: Callable[..., Any], *, params: Any = None, device: str | None = None,
                 inputs: dict[str, TensorSpec] | None = None,
                 outputs: dict[str, TensorSpec] | None = None, doc: str | None = None,
                 batchable: bool = False, debug: bool = False):
        if not callable(fn):
            raise TypeError(f"a JAX endpoint needs a callable, got {type(fn).__name__}")
        self.device = _device(device)
        self.fn = fn
        self.has_params = params is not None
        self.params = jax.device_put(params, self.device) if self.has_params else None
        self._shared = {_buffer(x) for x in jax.tree_util.tree_leaves(self.params)}
        if self.has_params:
            leaves, _ = pytree.flatten(self.params, _is_array)
            if len(leaves) != len(jax.tree_util.tree_leaves(self.params)):
                raise TypeError("params must be a pytree of arrays in dicts, lists and tuples "
                                "(for an Equinox module, serve eqx.partition's array part)")
        signature = inspect.signature(fn)
        if self.has_params:
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        self.call_signature = signature
        self.input_specs = dict(inputs or {})
        self.output_specs = dict(outputs or {})
        self.doc = doc if doc is not None else own_doc(fn, ("jax.",))
        self.batchable = batchable
        self.debug = debug
        self._compiled: OrderedDict[tuple, _Compiled] = OrderedDict()
        self._lock = threading.Lock()

    # -- description -------------------------------------------------------
    def parameters(self) -> Any:
        return self.params if self.has_params else {}

    def parameter_specs(self) -> dict[str, TensorSpec]:
        if not self.has_params:
            return {}
        return {jax.tree_util.keystr(path): self.leaf_spec(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]}

    def leaf_spec(self, x: Any) -> TensorSpec | None:
        if isinstance(x, _Leaf):
            x = x.value
        if isinstance(x, TensorSpec):
            return x
        if _is_array(x):
            return TensorSpec(tuple(x.shape), np.dtype(x.dtype).name)
        return None

    # -- calls -------------------------------------------------------------
    def make_leaf(self, wire: WireTensor, path: str) -> _Leaf:
        if wire.requires_grad and wire.dtype not in dtypes.DIFFERENTIABLE:
            raise invalid(f"{path}: requires_grad on a {dtypes.name_of(wire.dtype)} tensor; "
                          "only floating and complex tensors have gradients")
        if wire.dtype in (dtypes.code_of("float64"), dtypes.code_of("complex128"),
                          dtypes.code_of("int64")) and not jax.config.jax_enable_x64:
            raise invalid(f"{path}: {dtypes.name_of(wire.dtype)} input, but this server's JAX "
                          "runs without 64-bit types (start it with JAX_ENABLE_X64=1)")
        return _Leaf(NUMPY.from_wire(wire), wire.requires_grad)

    def forward(self, args: tuple, kwargs: dict, parameters: Any,
                need_vjp: bool) -> tuple[Any, Any, int]:
        self.check_arguments(args, kwargs)
        leaves, in_def, mask = self._flatten(args, kwargs, parameters)
        compiled = self._compile(in_def, mask)
        arrays = jax.device_put([leaf.value if isinstance(leaf, _Leaf) else leaf
                                 for leaf in leaves], self.device)
        diff = [a for a, m in zip(arrays, mask) if m]
        rest = [a for a, m in zip(arrays, mask) if not m]
        if not (need_vjp and diff):
            return self.run(lambda: compiled.forward(diff, rest)), None, 0
        outputs, vjp_fn = self.run(lambda: compiled.forward_vjp(diff, rest))
        return outputs, _Residual(vjp_fn, outputs, in_def, mask), self._residual_bytes(
            (vjp_fn, outputs, arrays))

    def vjp(self, residual: _Residual, cotangents: Any, batched: bool = False) -> tuple[Any, Any, Any]:
        out_leaves, cot_leaves = self.align_cotangents(residual.outputs, cotangents, _is_array)
        out_def = pytree.flatten(residual.outputs, _is_array)[1]
        batch = {c.value.shape[0] for c in cot_leaves
                 if isinstance(c, _Leaf) and batched and c.value.ndim}
        if len(batch) > 1:
            raise invalid(f"batched cotangents disagree on the batch size ({sorted(batch)})")
        size = batch.pop() if batch else 1
        if batched and size == 0:
            raise invalid("batched cotangents need a batch of at least one")
        cts = [self._cotangent(i, out, cot, size if batched else None)
               for i, (out, cot) in enumerate(zip(out_leaves, cot_leaves))]
        ct_tree = pytree.unflatten(out_def, jax.device_put(cts, self.device))
        backward = self._compile(residual.in_def, residual.mask)
        apply = backward.backward_batched if batched else backward.backward
        (grads,) = self.run(lambda: apply(residual.vjp_fn, ct_tree))
        by_leaf = iter(grads)
        return pytree.unflatten(residual.in_def, [next(by_leaf) if m else None
                                                  for m in residual.mask])

    def signature(self, args: tuple, kwargs: dict, parameters: Any) -> Any:
        self.check_arguments(args, kwargs)
        leaves, in_def, mask = self._flatten(args, kwargs, parameters)
        compiled = self._compile(in_def, tuple(False for _ in mask))
        shapes = [jax.ShapeDtypeStruct(spec.shape, dtypes.numpy_dtype(dtypes.code_of(spec.dtype)))
                  for spec in map(self.leaf_spec, leaves)]
        outputs = self.run(lambda: jax.eval_shape(compiled.call, [], shapes))
        return pytree.map_leaves(lambda s: TensorSpec(tuple(s.shape), np.dtype(s.dtype).name),
                                 outputs, lambda x: isinstance(x, jax.ShapeDtypeStruct))

    # -- helpers -----------------------------------------------------------
    def _residual_bytes(self, tree: Any) -> int:
        """Distinct device buffers in ``tree``, less the endpoint's own params."""
        seen: dict[Any, int] = {}
        for x in jax.tree_util.tree_leaves(tree):
            if isinstance(x, jax.Array) and _buffer(x) not in self._shared:
                seen[_buffer(x)] = x.nbytes
        return sum(seen.values())

    def _flatten(self, args: tuple, kwargs: dict,
                 parameters: Any) -> tuple[list, pytree.TreeDef, tuple[bool, ...]]:
        if parameters is not None:
            self._check_parameters(parameters)
        params = parameters if parameters is not None else self.params
        leaves, in_def = pytree.flatten((args, kwargs, params), _is_input_leaf)
        mask = tuple(isinstance(leaf, _Leaf) and leaf.requires_grad for leaf in leaves)
        return leaves, in_def, mask

    def _check_parameters(self, parameters: Any) -> None:
        if not self.has_params:
            raise invalid(f"endpoint {self.name!r} has no params; it is called as fn(*args)")
        own, own_def = pytree.flatten(self.params, _is_array)
        try:
            sent = pytree.flatten_up_to(own_def, parameters, "parameters")
        except ValueError as err:
            raise invalid(f"{err} (parameters must mirror the endpoint's params)") from None
        names = list(self.parameter_specs())
        for name, mine, theirs in zip(names, own, sent):
            want, got = self.leaf_spec(mine), self.leaf_spec(theirs)
            if got != want:
                shown = f"{got.dtype}{list(got.shape)}" if got else type(theirs).__name__
                raise invalid(f"parameter {name}: expected {want.dtype}{list(want.shape)}, "
                              f"got {shown}")

    def _cotangent(self, i: int, out: Any, cot: Any, batch: int | None) -> Any:
        shape = tuple(out.shape) if batch is None else (batch, *out.shape)
        differentiable = jax.dtypes.issubdtype(out.dtype, np.inexact)
        if cot is None or not differentiable:
            return np.zeros(shape, out.dtype if differentiable else jax.dtypes.float0)
        if not isinstance(cot, _Leaf):
            raise invalid(f"cotangent for output tensor #{i} must be a tensor or None, "
                          f"got {type(cot).__name__}")
        if cot.value.shape != shape or cot.value.dtype != out.dtype:
            want = f"{np.dtype(out.dtype).name}{[*(['B'] if batch else []), *out.shape]}"
            raise invalid(f"cotangent for output tensor #{i}: expected {want}, got "
                          f"{cot.value.dtype.name}{list(cot.value.shape)}")
        return cot.value

    def _compile(self, in_def: pytree.TreeDef, mask: tuple[bool, ...]) -> _Compiled:
        key = (in_def, mask)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        fn, has_params = self.fn, self.has_params

        def call(diff: list, rest: list) -> Any:
            d, r = iter(diff), iter(rest)
            args, kwargs, params = pytree.unflatten(in_def, [next(d) if m else next(r)
                                                             for m in mask])
            out = fn(params, *args, **kwargs) if has_params else fn(*args, **kwargs)
            return pytree.map_leaves(lambda x: x, out, _is_array)  # plain containers

        compiled = _Compiled(
            call=call,
            forward=jax.jit(call),
            forward_vjp=jax.jit(lambda diff, rest: jax.vjp(lambda d: call(d, rest), diff)),
            backward=jax.jit(lambda vjp_fn, ct: _torch_convention(vjp_fn)(ct)),
            backward_batched=jax.jit(lambda vjp_fn, cts: jax.vmap(_torch_convention(vjp_fn))(cts)))
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > COMPILE_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled


def _conj(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.conj(x) if jnp.iscomplexobj(x) else x, tree)


def _torch_convention(vjp_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The wire's complex convention is torch's (conjugate Wirtinger): conj . vjp . conj."""
    return lambda ct: _conj(vjp_fn(_conj(ct)))


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
