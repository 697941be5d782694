"""The JAX primitives a remote call becomes, and the rules JAX transforms them by.

With ``x`` the call's array leaves and ``f`` the endpoint:

- ``remote_call(x)``: ``f(x)``, and a token naming the residual its Forward kept;
- ``remote_jvp(x, token, tx)``: ``J(x) tx`` (a Jvp), linear in ``tx``; its transpose is
- ``remote_vjp(x, token, ct)``: ``J(x)ᵀ ct`` (a Vjp of the token's residual), linear in
  ``ct``; its transpose is ``remote_jvp``, and its derivative in ``x`` is
- ``remote_hvp(x, token, level, ct, dx)``: ``∂ₓ[J(x)ᵀ ct] dx``, a Vjp of the ``level``
  residual the kept Vjp made. That matrix is the Hessian of ``ct·f``, which is
  symmetric, so the primitive is its own transpose in ``dx``;
- ``remote_jvp2(x, token, t, dx)``: ``∂ₓ[J(x) t] dx``, the derivative of the JVP in ``x``
  (forward over forward), linear in ``t`` and ``dx``, whose transposes are ``remote_hvp``.

So ``grad``, ``jit``, ``vmap``, ``jvp``, ``linearize``, ``jacfwd``, ``jacrev``,
``hessian`` (forward over reverse), ``grad`` of ``grad``, ``jacrev`` of ``jacrev`` and
``jacfwd`` of ``jacfwd`` compose as they do on a local function. Each primitive runs on the host: directly on
concrete arrays, else through ``jax.pure_callback``. Under ``vmap`` every operand gets
the new batch axis in front (size one where it is not batched), so a host call sees all
its operands with the same leading batch axes and decides how to send them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from gradserve.frameworks.jax import as_jax
from gradserve.wire import dtypes, pytree
from gradserve.wire.specs import TensorType

if TYPE_CHECKING:
    from gradserve.client.remote import CallDef

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
    """One input signature of an endpoint: the call's structure and types, its outputs'."""

    in_def: "CallDef"
    in_types: tuple[TensorType, ...]
    out_def: pytree.TreeDef
    out_types: tuple[TensorType, ...]

    @property
    def diff_in(self) -> Mask:
        """Which input leaves have tangents."""
        return tuple(differentiable(t) for t in self.in_types)

    @property
    def diff_out(self) -> Mask:
        """Which outputs have tangents."""
        return tuple(differentiable(t) for t in self.out_types)


@dataclass(frozen=True)
class Params:
    """What a primitive's binding fixes: the function and signature, and which leaves
    each operand list holds (``mask``: the leaves the Forward differentiates)."""

    fn: Any                   # the RemoteJaxFunction whose ``host`` runs it
    sig: Signature
    mask: Mask = ()           # inputs the Forward (and a recompute) differentiates
    keep: bool = False        # call: keep a residual; vjp: keep the Vjp's graph (a level)
    t_mask: Mask = ()         # jvp: inputs with tangents
    ct_mask: Mask = ()        # vjp, hvp: outputs with cotangents
    g_mask: Mask = ()         # vjp, hvp: inputs whose gradients it returns
    dx_mask: Mask = ()        # hvp: inputs with a direction

    def operand_types(self, kind: str) -> list[TensorType]:
        """The base types (batch axes aside) of a primitive's operands."""
        x, y = list(self.sig.in_types), self.sig.out_types
        return {"call": x,
                "jvp": [*x, TOKEN, *pick(x, self.t_mask)],
                "vjp": [*x, TOKEN, *pick(y, self.ct_mask)],
                "hvp": [*x, TOKEN, TOKEN, *pick(y, self.ct_mask), *pick(x, self.dx_mask)],
                "jvp2": [*x, TOKEN, *pick(x, self.t_mask), *pick(x, self.dx_mask)]}[kind]

    def result_types(self, kind: str) -> list[TensorType]:
        """The base types of a primitive's results."""
        x, y = self.sig.in_types, self.sig.out_types
        return {"call": [*y, TOKEN],
                "jvp": pick(y, self.sig.diff_out),
                "vjp": [*pick(x, self.g_mask), *([TOKEN] if self.keep else [])],
                "hvp": pick(x, self.g_mask),
                "jvp2": pick(y, self.sig.diff_out)}[kind]


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


call_p, jvp_p, vjp_p, hvp_p, jvp2_p = (_make(kind)
                                       for kind in ("call", "jvp", "vjp", "hvp", "jvp2"))


def call(fn: Any, sig: Signature, leaves: Sequence[Any]) -> list[Any]:
    """The outputs of calling ``fn`` on ``leaves`` (of signature ``sig``)."""
    return list(call_p.bind(*leaves, params=Params(fn, sig)))[:-1]


# -- forward mode ----------------------------------------------------------------
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
    sig = params.sig
    n = len(sig.in_types)
    dx_mask = _present(tangents[:n], sig.in_types)
    d_t = list(tangents[n + 1:])
    dt_given = _given(d_t)
    outs = list(jvp_p.bind(*primals, params=params))
    sums: list[Any] = [None] * len(outs)
    if any(dt_given):
        sums = _add(sums, jvp_p.bind(*primals[:n + 1], *pick(d_t, dt_given),
                                     params=replace(params, t_mask=_narrow(params.t_mask,
                                                                           dt_given))))
    if any(dx_mask):
        _second_order(params, dx_mask)
        sums = _add(sums, jvp2_p.bind(*primals, *pick(tangents[:n], dx_mask),
                                      params=replace(params, mask=_or(params.mask, dx_mask),
                                                     dx_mask=dx_mask)))
    return outs, [_zero(o) if t is None else t for o, t in zip(outs, sums)]


def _jvp2_jvp(primals: Sequence[Any], tangents: Sequence[Any], *,
              params: Params) -> tuple[list[Any], list[Any]]:
    n, n_t = len(params.sig.in_types), sum(params.t_mask)
    if any(_given(tangents[:n + 1])):
        raise NotImplementedError(_third_order(params))
    outs = list(jvp2_p.bind(*primals, params=params))
    head, ts, dxs = primals[:n + 1], primals[n + 1:n + 1 + n_t], primals[n + 1 + n_t:]
    d_t, d_dx = tangents[n + 1:n + 1 + n_t], tangents[n + 1 + n_t:]
    sums: list[Any] = [None] * len(outs)
    if any(_given(d_t)):   # (a half whose tangents are all zero costs no remote calls)
        sums = _add(sums, jvp2_p.bind(*head, *map(ad.instantiate_zeros, d_t), *dxs,
                                      params=params))
    if any(_given(d_dx)):
        sums = _add(sums, jvp2_p.bind(*head, *ts, *map(ad.instantiate_zeros, d_dx),
                                      params=params))
    return outs, [_zero(o) if t is None else t for o, t in zip(outs, sums)]


def _jvp2_transpose(cts: Sequence[Any], *operands: Any, params: Params) -> list[Any]:
    """``∂ₓ[J t] dx`` is linear in ``t`` and in ``dx``; its transpose in either, for output
    cotangents ``ct``, is the Hessian of ``ct·f`` along the other."""
    sig = params.sig
    n, n_t = len(sig.in_types), sum(params.t_mask)
    t_linear = any(ad.is_undefined_primal(t) for t in operands[n + 1:n + 1 + n_t])
    if any(ad.is_undefined_primal(x) for x in operands[:n + 1]) or (
            t_linear and any(ad.is_undefined_primal(d) for d in operands[n + 1 + n_t:])):
        raise NotImplementedError(_third_order(params))
    per_output = spread(cts, sig.diff_out)
    ct_mask = _given(per_output)
    head = list(operands[:n + 1])
    if t_linear:
        linear, g_mask, direction, d_mask = (operands[n + 1:n + 1 + n_t], params.t_mask,
                                             operands[n + 1 + n_t:], params.dx_mask)
    else:
        linear, g_mask, direction, d_mask = (operands[n + 1 + n_t:], params.dx_mask,
                                             operands[n + 1:n + 1 + n_t], params.t_mask)
    none = [None] * len(operands)
    if not any(ct_mask):
        return none
    given = pick(per_output, ct_mask)
    kept = replace(params, keep=True, ct_mask=ct_mask, g_mask=g_mask, t_mask=())
    *_, level = vjp_p.bind(*head, *given, params=kept)
    found = hvp_p.bind(*head, level, *given, *direction,
                       params=replace(kept, keep=False, dx_mask=d_mask))
    start = n + 1 if t_linear else n + 1 + n_t
    none[start:start + len(linear)] = _fit(found, linear)
    return none


def _second_order(params: Params, perturbed: Mask) -> None:
    """Refuse a second derivative the symmetry of the Hessian does not give (complex)."""
    types = [*pick(params.sig.in_types, _or(params.mask, perturbed)),
             *pick(params.sig.out_types, params.sig.diff_out)]
    if any(t.dtype.startswith("complex") for t in types):
        raise NotImplementedError(
            f"gradserve: second derivatives of remote endpoint {params.fn.name!r} with "
            "complex inputs or outputs are not supported by the JAX client")


def _jvp_transpose(cts: Sequence[Any], *operands: Any, params: Params) -> list[Any]:
    n = len(params.sig.in_types)
    per_output = spread(cts, params.sig.diff_out)
    ct_mask = _given(per_output)
    none = [None] * (n + 1)
    if not any(ct_mask):
        return [*none, *(None for m in params.t_mask if m)]
    grads = vjp_p.bind(*operands[:n + 1], *pick(per_output, ct_mask),
                       params=replace(params, ct_mask=ct_mask, g_mask=params.t_mask,
                                      keep=False))
    return [*none, *_fit(grads, operands[n + 1:])]


# -- reverse mode ----------------------------------------------------------------
def _vjp_transpose(cts: Sequence[Any], *operands: Any, params: Params) -> list[Any]:
    n = len(params.sig.in_types)
    if params.keep or any(ad.is_undefined_primal(x) for x in operands[:n + 1]):
        raise NotImplementedError(_third_order(params))
    per_leaf = spread(cts, params.g_mask)
    t_mask = _given(per_leaf)
    none = [None] * (n + 1)
    if not any(t_mask):
        return [*none, *(None for m in params.ct_mask if m)]
    ty = jvp_p.bind(*operands[:n + 1], *pick(per_leaf, t_mask),
                    params=replace(params, t_mask=t_mask))
    per_output = spread(ty, params.sig.diff_out)
    return [*none, *_fit(pick(per_output, params.ct_mask), operands[n + 1:])]


def _vjp_jvp(primals: Sequence[Any], tangents: Sequence[Any], *,
             params: Params) -> tuple[list[Any], list[Any]]:
    sig = params.sig
    n = len(sig.in_types)
    dx_mask = _present(tangents[:n], sig.in_types)
    d_ct = list(tangents[n + 1:])
    dct_given = _given(d_ct)
    if any(dx_mask):
        if params.keep:
            raise NotImplementedError(_third_order(params))
        _second_order(params, dx_mask)
        kept = replace(params, keep=True, mask=_or(params.mask, dx_mask))
        *grads, level = vjp_p.bind(*primals, params=kept)
        primal_out = grads   # the level is this rule's own, not an output of the primitive
    else:
        kept = params
        primal_out = list(vjp_p.bind(*primals, params=params))
        grads = primal_out[:len(primal_out) - params.keep]
    sums: list[Any] = [None] * len(grads)
    if any(dct_given):
        ct_mask = _narrow(params.ct_mask, dct_given)
        sums = _add(sums, vjp_p.bind(*primals[:n + 1], *pick(d_ct, dct_given),
                                     params=replace(params, ct_mask=ct_mask, keep=False)))
    if any(dx_mask):
        sums = _add(sums, hvp_p.bind(*primals[:n + 1], level, *primals[n + 1:],
                                     *pick(tangents[:n], dx_mask),
                                     params=replace(kept, keep=False, dx_mask=dx_mask)))
    out_tangents = [_zero(g) if s is None else s for g, s in zip(grads, sums)]
    return primal_out, out_tangents + ([_zero(primal_out[-1])] if params.keep else [])


def _hvp_jvp(primals: Sequence[Any], tangents: Sequence[Any], *,
             params: Params) -> tuple[list[Any], list[Any]]:
    n_lin = sum(params.dx_mask)
    head = len(primals) - n_lin
    if any(_given(tangents[:head])):
        raise NotImplementedError(_third_order(params))
    outs = hvp_p.bind(*primals, params=params)
    d_dx = [ad.instantiate_zeros(t) for t in tangents[head:]]
    return list(outs), list(hvp_p.bind(*primals[:head], *d_dx, params=params))


def _hvp_transpose(cts: Sequence[Any], *operands: Any, params: Params) -> list[Any]:
    n_lin = sum(params.dx_mask)
    head = len(operands) - n_lin
    if any(ad.is_undefined_primal(x) for x in operands[:head]):
        raise NotImplementedError(_third_order(params))
    given = _given(cts)
    none = [None] * head
    if not any(given):
        return [*none, *([None] * n_lin)]
    swapped = replace(params, g_mask=params.dx_mask, dx_mask=_narrow(params.g_mask, given))
    return [*none, *_fit(hvp_p.bind(*operands[:head], *pick(cts, given), params=swapped),
                         operands[head:])]


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


def _narrow(mask: Mask, given: Sequence[bool]) -> Mask:
    """``mask`` with the leaves it selects kept only where ``given`` (one per selected)."""
    flags = iter(given)
    return tuple(m and next(flags) for m in mask)


def _add(sums: list[Any], terms: Sequence[Any]) -> list[Any]:
    return [t if s is None else s + t for s, t in zip(sums, terms)]


def _third_order(params: Params) -> str:
    return (f"gradserve: third and higher derivatives of remote endpoint {params.fn.name!r} "
            "are not supported by the JAX client (it serves first and second order); the "
            "torch client serves any order")


ad.primitive_jvps[call_p] = _call_jvp
ad.primitive_jvps[jvp_p] = _jvp_jvp
ad.primitive_jvps[vjp_p] = _vjp_jvp
ad.primitive_jvps[hvp_p] = _hvp_jvp
ad.primitive_jvps[jvp2_p] = _jvp2_jvp
ad.primitive_transposes[jvp_p] = _jvp_transpose
ad.primitive_transposes[vjp_p] = _vjp_transpose
ad.primitive_transposes[hvp_p] = _hvp_transpose
ad.primitive_transposes[jvp2_p] = _jvp2_transpose
