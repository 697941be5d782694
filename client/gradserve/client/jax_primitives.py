"""The JAX primitives a remote call becomes, and the rules JAX transforms them by.

A *level* is a differentiable remote function: the endpoint ``f`` (level 0), or the kept
Vjp of a level ``F``, ``G(z, w) = J_F(z)ᵀ w``, whose inputs are ``F``'s and the cotangents
``w`` and whose outputs are the gradients of ``F``'s inputs (the server keeps its graph,
so it has a Vjp of its own). With ``z`` a level's array leaves:

- ``remote_call(x)``: ``f(x)``, and a token naming the residual its Forward kept;
- ``remote_jvp(z, token, t)``: ``J(z) t``, linear in ``t``, whose transpose is
- ``remote_vjp(z, token, ct)``: ``J(z)ᵀ ct`` (a Vjp of the token's residual), linear in
  ``ct``; kept (``keep``), it also returns the token of the level it made.

Every derivative of these is one of them again, one level up:

- the derivative of ``J_Fᵀ ct`` along ``(dz, dct)`` is the JVP of the level ``G`` the Vjp
  keeps: ``J_G (dz, dct) = ∇²_z(ct·F) dz + J_Fᵀ dct``;
- a JVP at a level ``G`` above the endpoint is two Vjps: ``∇²_z(w·F)`` is a Hessian, so
  symmetric, so ``∇²_z(w·F) dz`` is the ``z`` part of ``G``'s Vjp along ``dz``; and
  ``J_Fᵀ dw`` is ``F``'s Vjp along ``dw``;
- the derivative of ``J(z) t`` in ``z`` goes through ``J(z) t``, the ``w`` part of the
  Vjp along ``t`` of the level kept with cotangents ``w = 0``.

So reverse and forward mode compose to any order (``grad`` of ``grad`` of ``grad``,
``jacfwd`` of ``hessian``, ``jvp`` of ``jvp``) with ``jit`` and ``vmap``. The symmetry
makes second and higher derivatives real-only: complex ones are refused. Each primitive
runs on the host: directly on concrete arrays, else through ``jax.pure_callback``. Under
``vmap`` every operand gets the new batch axis in front (size one where it is not
batched), so a host call sees all its operands with the same leading batch axes and
decides how to send them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from gradserve.client.remote import CallDef
from gradserve.frameworks.jax import as_jax
from gradserve.wire import dtypes, pytree
from gradserve.wire.specs import TensorType


TOKEN = TensorType((), "int32")
Mask = tuple[bool, ...]


def differentiable(t: TensorType) -> bool:
    """Whether arrays of type ``t`` have tangents (floating or complex)."""
    return dtypes.code_of(t.dtype) in dtypes.DIFFERENTIABLE


def numpy_dtype(t: TensorType) -> np.dtype[Any]:
    """The numpy dtype of ``t``."""
    return dtypes.numpy_dtype(dtypes.code_of(t.dtype))


def jax_dtype(t: TensorType) -> Any:
    """The dtype JAX gives ``t``: 64-bit types narrow to 32 bits unless x64 is on."""
    return jax.dtypes.canonicalize_dtype(numpy_dtype(t))


@dataclass(eq=False)
class Signature:
    """One input signature of a level: its call's structure and types, its outputs'; for a
    level above the endpoint, the level ``below`` whose kept Vjp it is and which of that
    one's outputs had cotangents (``ct_mask``), its inputs after ``below``'s."""

    in_def: CallDef
    in_types: tuple[TensorType, ...]
    out_def: pytree.TreeDef
    out_types: tuple[TensorType, ...]
    below: "Signature | None" = None
    ct_mask: Mask = ()
    _levels: dict[Mask, "Signature"] = field(default_factory=dict, repr=False)

    @property
    def diff_in(self) -> Mask:
        """Which input leaves have tangents."""
        return tuple(differentiable(t) for t in self.in_types)

    @property
    def diff_out(self) -> Mask:
        """Which outputs have tangents."""
        return tuple(differentiable(t) for t in self.out_types)

    def level(self, ct_mask: Mask) -> "Signature":
        """The level a kept Vjp makes with cotangents on the outputs ``ct_mask`` flags: its
        inputs ``((args, kwargs, parameters, cotangents), {}, {})`` of this one, its outputs
        the gradients ``(args, kwargs, parameters)`` of this one's inputs."""
        up = self._levels.get(ct_mask)
        if up is None:
            inputs = self.in_def.unflatten(self.in_types)
            cts = pytree.unflatten(self.out_def, spread(pick(self.out_types, ct_mask), ct_mask))
            types, treedef = pytree.flatten(
                ((inputs.args, inputs.kwargs, inputs.parameters, cts), {}, {}),
                lambda x: isinstance(x, TensorType))
            up = self._levels[ct_mask] = Signature(
                CallDef(treedef, 0), tuple(types), self.in_def.treedef, self.in_types, self,
                ct_mask)
        return up


@dataclass(frozen=True)
class Params:
    """What a primitive's binding fixes: the function and the level's signature, and which
    leaves each operand list holds (``mask``: the inputs the level's residual
    differentiates)."""

    fn: Any                   # the RemoteJaxFunction whose ``host`` runs it
    sig: Signature
    mask: Mask = ()           # inputs the residual (and a recompute) differentiates
    keep: bool = False        # call: keep a residual; vjp: keep the Vjp's graph (a level)
    t_mask: Mask = ()         # jvp: inputs with tangents
    ct_mask: Mask = ()        # vjp: outputs with cotangents
    g_mask: Mask = ()         # vjp: inputs whose gradients it returns

    def operand_types(self, kind: str) -> list[TensorType]:
        """The base types (batch axes aside) of a primitive's operands."""
        x, y = list(self.sig.in_types), self.sig.out_types
        return {"call": x,
                "jvp": [*x, TOKEN, *pick(x, self.t_mask)],
                "vjp": [*x, TOKEN, *pick(y, self.ct_mask)]}[kind]

    def result_types(self, kind: str) -> list[TensorType]:
        """The base types of a primitive's results."""
        x, y = self.sig.in_types, self.sig.out_types
        return {"call": [*y, TOKEN],
                "jvp": pick(y, self.sig.diff_out),
                "vjp": [*pick(x, self.g_mask), *([TOKEN] if self.keep else [])]}[kind]

    def up(self) -> "Params":
        """The level a kept Vjp with these parameters makes (differentiating its cotangents
        too)."""
        return Params(self.fn, self.sig.level(self.ct_mask),
                      self.mask + (True,) * sum(self.ct_mask))


def pick(items: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
    """The ``items`` whose flag in ``mask`` is set."""
    return [item for item, m in zip(items, mask) if m]


def _or(a: Mask, b: Mask) -> Mask:
    return tuple(p or q for p, q in zip(a, b)) if a else b


def _given(items: Sequence[Any]) -> Mask:
    """Which of ``items`` (tangents or cotangents; None or symbolic zeros where absent) hold
    values."""
    return tuple(c is not None and type(c) is not ad.Zero for c in items)


def _present(tangents: Sequence[Any], types: Sequence[TensorType]) -> Mask:
    return tuple(differentiable(t) and g for g, t in zip(_given(tangents), types))


def _zero(x: Any) -> ad.Zero:
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def batch_of(arrays: Sequence[Any], types: Sequence[TensorType]) -> tuple[int, ...]:
    """The batch axes a host call's operands share (the leading axes beyond their types)."""
    if not arrays:
        return ()
    k = len(arrays[0].shape) - len(types[0].shape)
    return tuple(np.broadcast_shapes(*(tuple(a.shape[:k]) for a in arrays)))


# -- the primitives --------------------------------------------------------------
def _make(kind: str) -> Primitive:
    prim = Primitive(f"remote_{kind}")
    prim.multiple_results = True

    def abstract(*ops: Any, params: Params) -> list[ShapedArray]:
        batch = batch_of(ops, params.operand_types(kind))
        return [ShapedArray(batch + t.shape, jax_dtype(t)) for t in params.result_types(kind)]

    def host(*arrays: Any, params: Params) -> tuple[Any, ...]:
        return tuple(params.fn.host(kind, params, [np.asarray(a) for a in arrays]))

    def eager(*ops: Any, params: Params) -> list[Any]:
        devices = {d for x in ops if isinstance(x, jax.Array) and x.committed
                   for d in x.devices()}
        if len(devices) > 1:   # where the results belong is for JAX to say
            return list(compiled(*ops, params=params))
        device = devices.pop() if devices else None
        return [as_jax(np.asarray(out), device) for out in host(*ops, params=params)]

    def staged(*ops: Any, params: Params) -> Any:
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in abstract(*ops, params=params)]
        return jax.pure_callback(lambda *a: host(*a, params=params), shapes, *ops)

    def batch_rule(args: Sequence[Any], dims: Sequence[Any], *,
                   params: Params) -> tuple[Any, list[int]]:
        moved = [jnp.expand_dims(a, 0) if d is None else jnp.moveaxis(a, d, 0)
                 for a, d in zip(args, dims)]
        outs = prim.bind(*moved, params=params)
        return outs, [0] * len(outs)

    compiled = jax.jit(lambda *ops, params: prim.bind(*ops, params=params),
                       static_argnames="params")
    prim.def_impl(eager)
    prim.def_abstract_eval(abstract)
    mlir.register_lowering(prim, mlir.lower_fun(staged, multiple_results=True))
    batching.primitive_batchers[prim] = batch_rule
    return prim


call_p, jvp_p, vjp_p = (_make(kind) for kind in ("call", "jvp", "vjp"))


def call(fn: Any, sig: Signature, leaves: Sequence[Any]) -> list[Any]:
    """The outputs of calling ``fn`` on ``leaves`` (of signature ``sig``)."""
    return list(call_p.bind(*leaves, params=Params(fn, sig)))[:-1]


# -- the derivatives of each ----------------------------------------------------
def _call_jvp(primals: Sequence[Any], tangents: Sequence[Any], *,
              params: Params) -> tuple[list[Any], list[Any]]:
    sig = params.sig
    t_mask = _present(tangents, sig.in_types)
    if not any(t_mask):
        outs = call_p.bind(*primals, params=params)
        return list(outs), [_zero(o) for o in outs]
    kept = replace(params, keep=True, mask=_or(params.mask, t_mask))
    *outs, token = call_p.bind(*primals, params=kept)
    ty = iter(jvp_p.bind(*primals, token, *pick(tangents, t_mask),
                         params=replace(kept, t_mask=t_mask)))
    out_tangents = [next(ty) if d else _zero(o) for o, d in zip(outs, sig.diff_out)]
    return [*outs, token], [*out_tangents, _zero(token)]


def _jvp_jvp(primals: Sequence[Any], tangents: Sequence[Any], *,
             params: Params) -> tuple[list[Any], list[Any]]:
    """The derivative of ``J(z) t``: along ``dt`` alone, ``J(z) dt``; along ``dz``, that of
    ``J(z) t`` as the ``w`` part of a Vjp along ``t`` of the level kept at ``w = 0``."""
    sig = params.sig
    n = len(sig.in_types)
    dz_mask = _present(tangents[:n], sig.in_types)
    z, token, ts = primals[:n], primals[n], primals[n + 1:]
    d_t = tangents[n + 1:]
    if not any(dz_mask):
        if not any(_given(d_t)):
            outs = list(jvp_p.bind(*primals, params=params))
            return outs, [_zero(o) for o in outs]
        return _twice(jvp_p, [*z, token], ts, d_t, params)
    _second_order(params, dz_mask)
    k = _batch_rank(z, sig.in_types)
    w0 = [jnp.zeros((1,) * k + t.shape, jax_dtype(t)) for t in pick(sig.out_types, sig.diff_out)]
    at_zero = replace(params, keep=True, mask=_or(params.mask, dz_mask), t_mask=(),
                      ct_mask=sig.diff_out, g_mask=(False,) * n)
    (level,) = vjp_p.bind(*z, token, *w0, params=at_zero)
    along_t = replace(at_zero.up(), ct_mask=params.t_mask,
                      g_mask=(False,) * n + (True,) * len(w0))
    return _vjp_jvp([*z, *w0, level, *ts], [*tangents[:n], *(None for _ in w0), None, *d_t],
                    params=along_t)


def _vjp_jvp(primals: Sequence[Any], tangents: Sequence[Any], *,
             params: Params) -> tuple[list[Any], list[Any]]:
    """The derivative of ``J(z)ᵀ ct`` along ``(dz, dct)``: the JVP of the level the Vjp
    keeps (along ``dct`` alone, with no level kept, the Vjp along ``dct``)."""
    sig = params.sig
    n = len(sig.in_types)
    dz_mask = _present(tangents[:n], sig.in_types)
    d_ct = tangents[n + 1:]
    dct_given = _given(d_ct)
    widened = _or(params.mask, dz_mask)
    if params.keep:   # the level it keeps may be differentiated in these inputs
        params = replace(params, mask=widened)
    if not any(params.g_mask) or not (any(dz_mask) or any(dct_given)):
        outs = list(vjp_p.bind(*primals, params=params))
        return outs, [_zero(o) for o in outs]
    if not any(dz_mask) and not params.keep:
        return _twice(vjp_p, primals[:n + 1], primals[n + 1:], d_ct, params)
    if any(dz_mask):
        _second_order(params, dz_mask)
    kept = replace(params, keep=True, mask=widened)
    *grads, level = vjp_p.bind(*primals, params=kept)
    up = replace(kept.up(), t_mask=dz_mask + dct_given)
    found = jvp_p.bind(*primals[:n], *primals[n + 1:], level, *pick(tangents[:n], dz_mask),
                       *pick(d_ct, dct_given), params=up)
    along = pick(spread(found, up.sig.diff_out), params.g_mask)
    out_tangents = [_zero(o) if a is None else a for o, a in zip(grads, along)]
    if params.keep:
        return [*grads, level], [*out_tangents, _zero(level)]
    return grads, out_tangents


def _twice(prim: Primitive, head: Sequence[Any], linear: Sequence[Any],
           d_linear: Sequence[Any], params: Params) -> tuple[list[Any], list[Any]]:
    """A primitive linear in its operands after ``head``, at ``linear`` and along
    ``d_linear``, as one binding: both stacked along a new leading batch axis."""
    both = [jnp.stack(jnp.broadcast_arrays(a, d if g else jnp.zeros_like(a)))
            for a, d, g in zip(linear, d_linear, _given(d_linear))]
    found = prim.bind(*(jnp.expand_dims(h, 0) for h in head), *both, params=params)
    return [f[0] for f in found], [f[1] for f in found]


def _jvp_transpose(cts: Sequence[Any], *operands: Any, params: Params) -> list[Any]:
    n = len(params.sig.in_types)
    if any(ad.is_undefined_primal(x) for x in operands[:n + 1]):
        raise NotImplementedError(_nonlinear(params))
    per_output = spread(cts, params.sig.diff_out)
    ct_mask = _given(per_output)
    none = [None] * (n + 1)
    if not any(ct_mask):
        return [*none, *(None for m in params.t_mask if m)]
    grads = vjp_p.bind(*operands[:n + 1], *pick(per_output, ct_mask),
                       params=replace(params, ct_mask=ct_mask, g_mask=params.t_mask,
                                      keep=False))
    return [*none, *_fit(grads, operands[n + 1:])]


def _vjp_transpose(cts: Sequence[Any], *operands: Any, params: Params) -> list[Any]:
    n = len(params.sig.in_types)
    if any(ad.is_undefined_primal(x) for x in operands[:n + 1]):
        raise NotImplementedError(_nonlinear(params))
    per_leaf = spread(cts[:sum(params.g_mask)], params.g_mask)
    t_mask = _given(per_leaf)
    none = [None] * (n + 1)
    if not any(t_mask):
        return [*none, *(None for m in params.ct_mask if m)]
    ty = jvp_p.bind(*operands[:n + 1], *pick(per_leaf, t_mask),
                    params=replace(params, t_mask=t_mask, keep=False))
    per_output = spread(ty, params.sig.diff_out)
    return [*none, *_fit(pick(per_output, params.ct_mask), operands[n + 1:])]


def _second_order(params: Params, perturbed: Mask) -> None:
    """Refuse a second derivative the symmetry of the Hessian does not give (complex)."""
    types = [*pick(params.sig.in_types, _or(params.mask, perturbed)),
             *pick(params.sig.out_types, params.sig.diff_out)]
    if any(t.dtype.startswith("complex") for t in types):
        raise NotImplementedError(
            f"gradserve: second derivatives of remote endpoint {params.fn.name!r} with "
            "complex inputs or outputs are not supported by the JAX client")


def _batch_rank(arrays: Sequence[Any], types: Sequence[TensorType]) -> int:
    """How many leading batch axes a primitive's operands carry (those of enclosing vmaps)."""
    return len(arrays[0].shape) - len(types[0].shape) if arrays else 0


def _fit(cts: Sequence[Any], operands: Sequence[Any]) -> list[Any]:
    """Transposes' results summed over the batch axes their linear operands were
    broadcast along (those of size one)."""
    fitted = []
    for ct, x in zip(cts, operands):
        shape = x.aval.shape
        axes = tuple(i for i, (s, c) in enumerate(zip(shape, ct.shape)) if s == 1 and c != 1)
        fitted.append(jnp.sum(ct, axis=axes, keepdims=True) if axes else ct)
    return fitted


def spread(items: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
    """``items`` (one per set flag of ``mask``) at their places, None elsewhere."""
    found = iter(items)
    return [next(found) if m else None for m in mask]


def _nonlinear(params: Params) -> str:
    return (f"gradserve: a transpose of remote endpoint {params.fn.name!r} was asked in an "
            "operand it is not linear in (a bug in gradserve)")


ad.primitive_jvps[call_p] = _call_jvp
ad.primitive_jvps[jvp_p] = _jvp_jvp
ad.primitive_jvps[vjp_p] = _vjp_jvp
ad.primitive_transposes[jvp_p] = _jvp_transpose
ad.primitive_transposes[vjp_p] = _vjp_transpose
