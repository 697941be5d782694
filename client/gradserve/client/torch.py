"""Remote endpoints as torch autograd nodes.

``RemoteFunction`` calls an endpoint on torch tensors; when any input requires
grad, the call is recorded as one autograd node (``_RemoteForward``) whose
backward sends a Vjp. The backward is itself an autograd function
(``_RemoteBackward``) that takes the forward's inputs and the cotangents, so that
autograd sees the gradient depend on both. Under ``create_graph=True`` (double
backward, ``hessian``, Hessian-vector products) the Vjp keeps its graph on the
server, and the node's own backward is the Vjp of that Vjp: the same function one
level up, to any order.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gradserve.client.calls import Residual
from gradserve.errors import GradserveError
from gradserve.client.core import Client
from gradserve.client.remote import CallDef, RemoteEndpoint, flatten_call, higher_order_refusal, \
    mergeable
from gradserve.frameworks.torch import ADAPTER, is_differentiable
from gradserve.wire import pytree
from gradserve.wire.codec import Arguments, MakeLeaf
from gradserve.wire.memory import WireTensor
from gradserve.wire.specs import EndpointInfo


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _is_functorch_wrapped(t: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _grad_levels() -> int | None:
    """How many torch.func grad transforms (grad, vjp, jacrev) are running now; None
    outside torch.func."""
    stack = torch._C._functorch.get_interpreter_stack()
    if not stack:
        return None
    return sum(i.key() == torch._C._functorch.TransformType.Grad for i in stack)


def _tracked(tensors: Any, *kinds: Any) -> bool:
    """Whether any of ``tensors``, which a torch.func node saved, is tracked by a running
    transform of ``kinds`` (grad, jvp) other than the node's own (its outermost wrapper that
    is not a vmap's): what the node computes from it will be differentiated again (grad of
    grad, jacrev of jacrev, jvp of jvp, grad of jvp)."""
    functorch = torch._C._functorch
    running = {i.level() for i in functorch.get_interpreter_stack() or [] if i.key() in kinds}
    for t in tensors:
        own = True
        while t is not None and _is_functorch_wrapped(t):
            if not functorch.is_batchedtensor(t):
                if not own and functorch.maybe_get_level(t) in running:
                    return True
                own = False
            t = functorch.get_unwrapped(t)
    return False


_DIFFERENTIATING = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def _vmap_level() -> int:
    """The level of the vmap whose rule is running (the stack holds the levels below it)."""
    return len(torch._C._functorch.get_interpreter_stack() or []) + 1


def _plain(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``t`` without torch.func's wrappers (its values), and the levels of the vmaps it
    was batched by (their batch axes moved to the front)."""
    functorch = torch._C._functorch
    levels: list[int] = []
    while _is_functorch_wrapped(t):
        if functorch.is_batchedtensor(t):
            bdim, level = functorch.maybe_get_bdim(t), functorch.maybe_get_level(t)
            t = functorch.get_unwrapped(t).movedim(bdim, 0)
            levels.append(level)
        else:
            t = functorch.get_unwrapped(t)
    return t, tuple(levels)


def _torch_leaf(wire: WireTensor, path: str) -> torch.Tensor:
    return ADAPTER.from_wire(wire)


def _leaf_maker(leaves: list[torch.Tensor]) -> MakeLeaf:
    """Decode outputs onto the device of the caller's first non-CPU input, if any."""
    device = next((t.device for t in leaves if t.device.type != "cpu"), None)
    if device is None:
        return _torch_leaf
    return lambda wire, path: ADAPTER.from_wire(wire).to(device, non_blocking=True)


class _State:
    """What one remote call's forward hands its backward.

    After a plain forward, ``residual`` names the server's state. After a
    forward under ``torch.func.vmap``, ``batched`` holds the per-call states:
    one merged call (``merged``) or one per batch element.
    """

    def __init__(self, fn: "RemoteFunction", call_def: CallDef, make_leaf: MakeLeaf,
                 mask: tuple[bool, ...]):
        self.fn = fn
        self.call_def = call_def
        self.make_leaf = make_leaf
        self.mask = mask
        self.out_def: pytree.TreeDef | None = None
        #: zeros like each differentiable output (None for the others), once it has run
        self.zeros: list[torch.Tensor | None] = []
        self.residual: Residual | None = None
        self.batched: list["_State"] = []
        self.merged = False
        #: the level of the vmap whose elements ``batched`` are
        self.vmap_level = 0
        #: (device, dtype) of each input leaf: where its gradient goes (set when it runs)
        self.devices: list[tuple[torch.device, torch.dtype]] = []

    def child(self) -> "_State":
        return _State(self.fn, self.call_def, self.make_leaf, self.mask)

    def level(self, residual: Residual, leaves: list[Any], cotangents: Any,
              flag: Callable[[torch.Tensor], bool]) -> "_State":
        """The call a kept Vjp of this one made: its inputs are this call's ``leaves`` and
        ``cotangents``, its outputs one gradient per leaf."""
        inputs = self.call_def.unflatten(leaves)
        tree: Any = ((inputs.args, inputs.kwargs, inputs.parameters, cotangents), {}, {})
        new_leaves, treedef = pytree.flatten(tree, _is_tensor)
        up = _State(self.fn, CallDef(treedef, 0), self.make_leaf,
                    tuple(flag(t) for t in new_leaves))
        up.residual, up.out_def = residual, self.call_def.treedef
        up.devices = [(t.device, t.dtype) for t in new_leaves]
        return up

    @property
    def n_inputs(self) -> int:
        """Leaves that are arguments (the rest are parameters)."""
        return len(self.mask) - self.call_def.n_params


class _Function(torch.autograd.Function):
    """An autograd function whose ``forward`` takes no defaults: outside functorch
    transforms, ``apply`` skips the signature binding torch does for every call (which
    costs more than the rest of a node)."""

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        if kwargs or torch._C._are_functorch_transforms_active():
            return super().apply(*args, **kwargs)
        args = torch._functorch.utils.unwrap_dead_wrappers(args)
        return super(torch.autograd.Function, cls).apply(*args)  # type: ignore[misc]


class _RemoteForward(_Function):
    @staticmethod
    def forward(state: _State, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call = state.fn.make_call(state.call_def, leaves, state.mask)
        outputs, state.residual = state.fn.forward(call, state.make_leaf,
                                                   need_vjp=any(state.mask))
        out_leaves, state.out_def = pytree.flatten(outputs, _is_tensor)
        state.zeros = [torch.zeros_like(o) if is_differentiable(o) else None for o in out_leaves]
        return tuple(out_leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        state, *leaves = inputs
        ctx.state = state
        state.devices = [(leaf.device, leaf.dtype) for leaf in leaves]
        ctx.save_for_backward(*leaves)
        ctx.save_for_forward(*leaves)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*[o for o in output if not is_differentiable(o)])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        leaves = ctx.saved_tensors   # raises if an input was modified in place
        return (None, *_RemoteBackward.apply(ctx.state, _Kept.wanted(ctx.state.fn, leaves),
                                             len(grads), False, *grads, *leaves))

    @staticmethod
    def jvp(ctx: Any, _: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Forward mode: a Jvp of the call with the inputs' tangents (the server runs the
        call again, in forward mode)."""
        state: _State = ctx.state
        if _tracked([*ctx.saved_tensors, *tangents], *_DIFFERENTIATING):
            return _jvp_by_vjps(state, list(ctx.saved_tensors), list(tangents))
        primals = [_plain(t) for t in ctx.saved_tensors]
        found = [None if t is None else _plain(t) for t in tangents]
        outer = {level for _, levels in primals for level in levels}
        inner = {level for u in found if u is not None for level in u[1]} - outer
        if len(outer) > 1 or len(inner) > 1:
            raise NotImplementedError(
                f"gradserve: forward mode through remote endpoint {state.fn.name!r} under "
                "more than one vmap besides jacfwd's is not supported")
        level = next(iter(inner), None)
        with torch._C._DisableFuncTorch():   # plain values: what travels, and what is built
            if not outer:   # one Jvp (with a batch of tangents under jacfwd)
                return _wrapped(_jvp_plain(state, [x for x, _ in primals], found, level),
                                (level,))
            (by,) = outer   # vmap of jvp: one Jvp per element of that vmap
            size = next(x.shape[0] for x, levels in primals if levels)
            per = [_jvp_plain(state, [x[b] if levels else x for x, levels in primals],
                              [None if u is None else _select(u, by, b) for u in found], level)
                   for b in range(size)]
            stacked = [None if parts[0] is None
                       else torch.stack([t for t in parts if t is not None])
                       for parts in zip(*per)]
        return _wrapped(stacked, (by, level))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], state: _State,
             *leaves: torch.Tensor) -> tuple[Any, ...]:
        size = info.batch_size
        state.vmap_level = _vmap_level()
        leaves = tuple(x if d is None else x.movedim(d, 0) for x, d in zip(leaves, in_dims[1:]))
        batched = [d is not None for d in in_dims[1:]]
        n = state.n_inputs
        state.merged = mergeable(state.fn.batchable,
                                 [x.dim() - b for x, b in zip(leaves[:n], batched)],
                                 any(batched[n:]), any(state.mask[n:]))
        if state.merged:
            sub = state.child()
            full = [x if b else x.expand(size, *x.shape) for x, b in zip(leaves, batched)]
            merged = [x.reshape(-1, *x.shape[2:]) if i < n else leaves[i]
                      for i, x in enumerate(full)]
            outs = _RemoteForward.apply(sub, *merged)
            state.batched, state.out_def = [sub], sub.out_def
            outs = tuple(o.reshape(size, -1, *o.shape[1:]) if o.dim() else o.expand(size)
                         for o in outs)
            return outs, tuple(0 for _ in outs)
        state.batched = [state.child() for _ in range(size)]
        per = [_RemoteForward.apply(sub, *[x[i] if b else x for x, b in zip(leaves, batched)])
               for i, sub in enumerate(state.batched)]
        state.out_def = state.batched[0].out_def
        outs = tuple(torch.stack(parts) for parts in zip(*per))
        return outs, tuple(0 for _ in outs)


class _Kept:
    """Where a kept Vjp (``create_graph=True``) leaves the state of the call it made."""

    def __init__(self, func: bool) -> None:
        self.state: _State | None = None
        #: made under torch.func, whose nodes' forwards see their inputs unwrapped (so
        #: whether they are tracked is invisible there): differentiate all that could be
        self.func = func

    def flags(self, t: torch.Tensor) -> bool:
        """Whether the kept Vjp differentiates ``t`` (an input or a cotangent)."""
        return t.requires_grad or (self.func and is_differentiable(t))

    @staticmethod
    def wanted(fn: "RemoteFunction", leaves: Any) -> "_Kept | None":
        """A new one when the backward running now builds a graph that will be
        differentiated (``create_graph``; under ``torch.func``, the call's inputs ``leaves``
        are tracked by a grad transform still running) and ``fn``'s server can keep it
        (else None: the gradients then refuse to be differentiated)."""
        if _grad_levels() is None:
            building = torch.is_grad_enabled()
        else:   # torch.func runs every backward with grad mode on
            building = _tracked(leaves, torch._C._functorch.TransformType.Grad)
        return _Kept(_grad_levels() is not None) if building and fn.info.reverse_order != 1 \
            else None


class _RemoteBackward(_Function):
    """The Vjp of a remote call as an autograd node of its own. Its inputs are the
    cotangents (``n_grads``, None where an output has none) and then the call's inputs;
    its outputs are the gradients for those inputs. With ``kept`` (a backward under
    ``create_graph=True``) the server keeps the Vjp's graph, and this node's backward is
    the Vjp of that call, whose inputs are the call's inputs and the cotangents."""

    @staticmethod
    def forward(state: _State, kept: _Kept | None, n_grads: int, batched: bool,
                *grads_and_leaves: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return _vjp(state, list(grads_and_leaves[:n_grads]), batched=batched, kept=kept,
                    leaves=list(grads_and_leaves[n_grads:]))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        state, kept, n_grads, batched, *grads_and_leaves = inputs
        ctx.state, ctx.endpoint, ctx.kept, ctx.n_grads = state, state.fn.name, kept, n_grads
        ctx.batched = batched
        ctx.present = [g is not None for g in grads_and_leaves]
        ctx.set_materialize_grads(False)
        if kept is not None:
            ctx.save_for_backward(*grads_and_leaves)
        ctx.save_for_forward(*(t for t in grads_and_leaves if t is not None))

    @staticmethod
    def backward(ctx: Any, *ggrads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        state = ctx.kept.state if ctx.kept is not None else None
        if state is None and _grad_levels() is not None:
            raise NotImplementedError(_NESTED.format(name=ctx.endpoint))
        if state is None:
            raise RuntimeError(higher_order_refusal(
                ctx.endpoint, "its endpoint serves first-order reverse mode only"))
        saved = ctx.saved_tensors
        grads, leaves = saved[:ctx.n_grads], saved[ctx.n_grads:]
        inputs = [*leaves, *(g for g in grads if g is not None)]   # the kept call's leaves
        out = _RemoteBackward.apply(state, _Kept.wanted(state.fn, inputs), len(ggrads), False,
                                    *ggrads, *inputs)
        for_leaves, for_grads = iter(out[:len(leaves)]), iter(out[len(leaves):])
        return (None, None, None, None,
                *(next(for_grads) if present else None
                  for present in ctx.present[:ctx.n_grads]),
                *for_leaves)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[torch.Tensor | None, ...]:
        """Forward mode over the Vjp (torch.func.hessian, jacfwd of jacrev): the tangent of
        ``J(x)ᵀ ct`` is ``J(x)ᵀ dct + ∂ₓ[J(x)ᵀ ct] dx``, the second a Vjp of a kept Vjp (that
        matrix is the Hessian of ``ct·f``, so it is its own transpose)."""
        return _vjp_tangents(ctx, list(tangents[4:]))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], state: _State, kept: _Kept | None,
             n_grads: int, batched_cts: bool, *grads_and_leaves: Any) -> tuple[Any, ...]:
        size = info.batch_size
        # the call ran under an outer vmap, one call per element, and this vmap is another's
        outer = bool(state.batched) and state.vmap_level != _vmap_level()
        if (batched_cts and (not state.batched or outer or state.merged)) or (
                outer and (kept is not None or state.merged)):
            raise NotImplementedError(_NESTED.format(name=state.fn.name))
        grads = [g if g is None or d is None else g.movedim(d, 0)
                 for g, d in zip(grads_and_leaves[:n_grads], in_dims[4:])]
        batched = [d is not None for d in in_dims[4:4 + n_grads]]
        full = [g if g is None or b else g.expand(size, *g.shape) for g, b in zip(grads, batched)]
        out: list[torch.Tensor | None]
        if not state.batched and kept is not None:   # jacrev of jacrev: a kept Vjp each
            leaves = grads_and_leaves[n_grads:]
            per = [_RemoteBackward.apply(state, _Kept(kept.func), n_grads, False,
                                         *[None if g is None else g[i] for g in full], *leaves)
                   for i in range(size)]
            out = [None if parts[0] is None else torch.stack(parts) for parts in zip(*per)]
        elif not state.batched or outer:
            # one forward, many cotangents (jacrev): one batched Vjp (under the outer vmap,
            # its rule sends one per element, each with the whole batch of cotangents)
            out = list(_RemoteBackward.apply(state, kept, n_grads, True, *full,
                                             *grads_and_leaves[n_grads:]))
        elif state.merged:
            sub = state.batched[0]
            n = state.n_inputs
            flat = [None if g is None else g.reshape(-1, *g.shape[2:]) if g.dim() > 1 else g[0]
                    for g in full]
            out = [None if g is None else g.reshape(size, -1, *g.shape[1:]) if i < n else g
                   for i, g in enumerate(_RemoteBackward.apply(sub, None, len(flat), False,
                                                               *flat))]
        else:
            per = [_RemoteBackward.apply(sub, None, n_grads, batched_cts,
                                         *[None if g is None else g[i] for g in full])
                   for i, sub in enumerate(state.batched)]
            out = [None if parts[0] is None else torch.stack(parts) for parts in zip(*per)]
        return tuple(out), tuple(None if g is None else 0 for g in out)


_FORWARD_AGAIN = (
    "gradserve: a torch.func forward-mode derivative of remote endpoint {name!r} whose "
    "result is differentiated again beyond second order (jacfwd of hessian, jvp of jvp of "
    "jvp, jvp of a Hessian-vector product) or under vmap is not supported; second order in "
    "any mode (hessian, jacfwd of jacfwd, jvp of jvp, grad of jvp) and torch.autograd to any "
    "order (create_graph=True) are")
_NESTED = ("gradserve: the Vjp of remote endpoint {name!r} under this nesting of torch.func "
           "transforms is not supported yet; torch.func.hessian, jacrev of jacrev, grad of "
           "grad, jvp of grad and torch.autograd.functional.hessian are")


def _jvp_by_vjps(state: _State, saved: list[torch.Tensor],
                 tangents: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """``J(x) t`` where it is differentiated again (jvp of jvp, grad of jvp): the ``w``
    part of the Vjp along ``t`` of the call's Vjp kept at cotangents ``w = 0``, an autograd
    node of its own, so the transforms outside see it depend on ``x`` and ``t``."""
    functorch = torch._C._functorch
    own = functorch.get_interpreter_stack()[-1].level()
    xs = [_peel(x, own) for x in saved]
    ts = [None if t is None else _peel(t, own) for t in tangents]
    with torch._C._DisableFuncTorch():
        plain = [_plain(x) for x in xs]
        if any(levels for _, levels in plain):
            raise NotImplementedError(_FORWARD_AGAIN.format(name=state.fn.name))
        leaves = [x for x, _ in plain]
        flags = [is_differentiable(x) for x in leaves]
        residual = state.residual   # the forward's, if it differentiates every input
        if residual is None or not all(m or not f for m, f in zip(state.mask, flags)):
            residual = Residual(state.fn.make_call(state.call_def, leaves, flags))
        out_def, zeros = state.out_def, state.zeros
        assert out_def is not None
        w0 = [z for z in zeros if z is not None]
        flagged = {id(z) for z in w0}
        _, level_residual = state.fn.vjp_kept(residual, pytree.unflatten(out_def, zeros),
                                              _torch_leaf,
                                              requires_grad=lambda a: id(a) in flagged)
        up = state.level(level_residual, leaves, pytree.unflatten(out_def, zeros),
                         is_differentiable)
    kept = _Kept(True) if _grad_levels() else None
    found = _RemoteBackward.apply(up, kept, len(leaves), False, *ts, *xs, *w0)
    along = iter(found[len(leaves):])
    return tuple(next(along) if z is not None else None for z in zeros)


def _peel(t: torch.Tensor, level: int) -> torch.Tensor:
    """``t`` without the wrappers of transforms that ended and then without its outermost
    if that is transform ``level``'s: what the transforms outside it track."""
    functorch = torch._C._functorch
    (t,) = torch._functorch.utils.unwrap_dead_wrappers((t,))
    if _is_functorch_wrapped(t) and functorch.maybe_get_level(t) == level:
        return functorch.get_unwrapped(t)
    return t


def _jvp_plain(state: _State, leaves: list[torch.Tensor],
               tangents: list[tuple[torch.Tensor, tuple[int, ...]] | None],
               level: int | None) -> list[torch.Tensor | None]:
    """The output tangents of one Jvp of ``state``'s call at plain ``leaves``, for plain
    ``tangents`` (with the levels they are batched by: at most ``level``, jacfwd's, whose
    batch then goes as one call and leads each result); None for outputs without. Runs
    with torch.func's transforms off (``_DisableFuncTorch``)."""
    size = next((t.shape[0] for t, levels in filter(None, tangents) if levels), 0)
    plain = [None if u is None or not is_differentiable(x)
             else u[0] if u[1] or level is None else u[0].expand(size, *u[0].shape)
             for x, u in zip(leaves, tangents)]
    call = state.fn.make_call(state.call_def, leaves)
    outputs, out_tangents = state.fn.jvp(call, state.call_def.unflatten(plain),
                                         state.make_leaf, batched=level is not None)
    outs, out_def = pytree.flatten(outputs, _is_tensor)
    result: list[torch.Tensor | None] = []
    for o, t in zip(outs, pytree.flatten_up_to(out_def, out_tangents)):
        if is_differentiable(o) and t is None:
            t = torch.zeros((size, *o.shape) if level is not None else o.shape,
                            dtype=o.dtype, device=o.device)
        result.append(t if is_differentiable(o) else None)
    return result


def _select(found: tuple[torch.Tensor, tuple[int, ...]], level: int,
            b: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Element ``b`` of vmap ``level`` of a plain value batched by ``found[1]`` (the
    outermost wrapper's level first; their axes lead in the opposite order)."""
    value, levels = found
    if level not in levels:
        return found
    axis = len(levels) - 1 - levels.index(level)
    return value.select(axis, b), tuple(lv for lv in levels if lv != level)


def _wrapped(results: list[torch.Tensor | None],
             levels: tuple[int | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """Plain results whose leading axes are those of vmap ``levels`` (outer first; None
    where there is none), batched by them again."""
    wrapped = []
    for t in results:
        for level in levels:
            if t is not None and level is not None:
                t = torch._C._functorch._add_batch_dim(t, 0, level)
        wrapped.append(t)
    return tuple(wrapped)


def _waits_on_itself(info: EndpointInfo) -> bool:
    """Whether a CUDA backward calling this endpoint would deadlock: a torch endpoint on a
    GPU whose server shares this process (torch's engine runs both on one device thread)."""
    return (info.same_process and info.framework == "torch"
            and any(d.startswith("cuda") for d in info.devices))


def _vjp_tangents(ctx: Any, tangents: list[Any]) -> tuple[torch.Tensor | None, ...]:
    """The tangents of a Vjp's gradients (``_RemoteBackward.jvp``): a Vjp of the call for
    the cotangents' tangents, and a Vjp of a kept Vjp for the inputs' (per cotangent of a
    batch of them); under jacfwd, each is one Vjp with a batch of directions."""
    state: _State = ctx.state
    if _tracked([*ctx.saved_tensors, *tangents], *_DIFFERENTIATING):
        raise NotImplementedError(_FORWARD_AGAIN.format(name=state.fn.name))
    saved = iter(ctx.saved_tensors)
    values = [_plain(next(saved))[0] if p else None for p in ctx.present]
    grads, n = values[:ctx.n_grads], ctx.n_grads
    found = [None if t is None else _plain(t) for t in tangents]
    vmapped = {layer for u in found if u is not None for layer in u[1]}
    if len(vmapped) > 1 or state.residual is None or state.out_def is None:
        raise NotImplementedError(
            f"gradserve: forward mode over a gradient of remote endpoint {state.fn.name!r} "
            "under more than one vmap (vmap of hessian) is not supported")
    if any(v is not None and v.is_complex() for v in values):
        raise NotImplementedError(
            f"gradserve: forward mode over a gradient of remote endpoint {state.fn.name!r} "
            "with complex inputs or outputs is not supported")
    level = next(iter(vmapped), None)
    size = next((u[0].shape[0] for u in found if u is not None and u[1]), 0)
    axis = 0 if level is None else 1     # the cotangents' own batch (jacrev), after jacfwd's
    per_ct = range(grads[0].shape[0] if ctx.batched and grads[0] is not None else 1)

    def at(t: torch.Tensor | None, b: int, dim: int) -> torch.Tensor | None:
        return t if t is None or not ctx.batched else t.select(dim, b)

    result: list[torch.Tensor | None] = []
    with torch._C._DisableFuncTorch():   # plain values: what travels, and what is built
        directions = [None if u is None else u[0] if u[1] or level is None
                      else u[0].expand(size, *u[0].shape) for u in found]
        d_cts, d_xs = directions[:n], directions[n:]
        sums: list[list[torch.Tensor | None]] = []
        for b in per_ct:
            terms: list[torch.Tensor | None] = [None] * len(state.devices)
            if any(d is not None for d in d_xs):
                cts = pytree.unflatten(state.out_def, [at(g, b, 0) for g in grads])
                _, level_residual = state.fn.vjp_kept(state.residual, cts, _torch_leaf)
                found_x = state.fn.vjp(level_residual, state.call_def.unflatten(d_xs).tree,
                                       _torch_leaf, batched=level is not None)
                terms = _summed(terms, state.call_def.grads(Arguments(*found_x.args[:3])))
            if any(d is not None for d in d_cts):
                d_ct = pytree.unflatten(state.out_def, [at(d, b, axis) for d in d_cts])
                terms = _summed(terms, state.call_def.grads(
                    state.fn.vjp(state.residual, d_ct, _torch_leaf, batched=level is not None)))
            sums.append(terms)
        for i, (device, dtype) in enumerate(state.devices):
            parts = [terms[i] for terms in sums]
            if any(p is None for p in parts):
                result.append(None)
                continue
            t = torch.stack(parts, axis) if ctx.batched else parts[0]  # type: ignore[arg-type]
            assert t is not None
            result.append(t.to(device=device, dtype=dtype))
    return tuple(t if t is None or level is None
                 else torch._C._functorch._add_batch_dim(t, 0, level) for t in result)


def _summed(terms: list[torch.Tensor | None], more: list[Any]) -> list[torch.Tensor | None]:
    return [m if t is None else t if m is None else t + m for t, m in zip(terms, more)]


def _vjp(state: _State, grads: list[torch.Tensor | None], *,
         batched: bool, kept: _Kept | None = None,
         leaves: list[Any] | None = None) -> tuple[torch.Tensor | None, ...]:
    """Send the Vjp of a call; gradients on the inputs' devices and dtypes. With ``kept``
    (and the call's input ``leaves``), the server keeps its graph and ``kept.state``
    becomes the call it made."""
    if all(g is None for g in grads) or state.residual is None or state.out_def is None:
        return tuple(None for _ in state.devices)
    if any(g is not None and _is_functorch_wrapped(g) for g in grads):
        raise NotImplementedError(_NESTED.format(name=state.fn.name))
    if any(g is not None and g.is_cuda for g in grads) and _waits_on_itself(state.fn.info):
        raise GradserveError(
            f"the Vjp of remote endpoint {state.fn.name!r} cannot run here: its server runs "
            "in this process, and torch runs this CUDA backward on the device thread that the "
            "server's own backward needs (it would wait forever); serve the model from another "
            "process (gradserve serve), or send CPU tensors")
    cotangents = pytree.unflatten(state.out_def, grads)
    if kept is None or leaves is None:
        result = state.fn.vjp(state.residual, cotangents, _torch_leaf, batched=batched)
    else:
        flagged = {id(g) for g in grads if g is not None and kept.flags(g)}
        result, residual = state.fn.vjp_kept(state.residual, cotangents, _torch_leaf,
                                             requires_grad=lambda x: id(x) in flagged,
                                             batched=batched)
        kept.state = state.level(residual, leaves, cotangents, kept.flags)
    return tuple(None if g is None else g.to(device=dev, dtype=dt)
                 for g, (dev, dt) in zip(state.call_def.grads(result), state.devices))


class RemoteFunction(RemoteEndpoint):
    """A remote endpoint called on torch tensors, differentiable with torch autograd.

    Inputs and outputs are pytrees (tuples, lists, dicts of tensors and static
    values); keyword arguments may be tensors and are differentiable too.
    """

    framework = "torch"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(args, kwargs)

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any],
              parameters: dict[str, torch.Tensor] | None = None) -> Any:
        """Run the endpoint; ``parameters`` replace the endpoint's own by name."""
        leaves, call_def = flatten_call(Arguments(tuple(args), dict(kwargs), parameters),
                                        _is_tensor)
        grad = torch.is_grad_enabled()
        if any(_is_functorch_wrapped(t) for t in leaves):
            # under torch.func the tracking level is invisible here: flag what could need
            # grad, when a grad transform is on the stack (jvp and vmap alone track none)
            grad = grad and bool(_grad_levels())
            mask = tuple(grad and is_differentiable(t) for t in leaves)
        else:
            mask = tuple(grad and t.requires_grad and is_differentiable(t) for t in leaves)
        state = _State(self, call_def, _leaf_maker(leaves), mask)
        out_leaves = _RemoteForward.apply(state, *leaves)
        assert state.out_def is not None
        return pytree.unflatten(state.out_def, list(out_leaves))


class RemoteModule(torch.nn.Module):
    """An endpoint's parameters as local ``nn.Parameter``s, trained through the remote model.

    Each call sends the current parameter values and receives their gradients,
    so any torch optimizer over ``module.parameters()`` fine-tunes the model.
    """

    def __init__(self, client: Client, name: str, *, timeout: float | None = None):
        super().__init__()
        self._remote = RemoteFunction(client, name, timeout=timeout)
        values = client.parameters(name, like="torch", timeout=timeout)
        if not values:
            raise ValueError(f"endpoint {name!r} has no parameters to hold locally")
        for qualified, value in values.items():
            owner: torch.nn.Module = self
            *path, leaf = qualified.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(value.clone()))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._remote.call(args, kwargs, dict(self.named_parameters()))
