"""PyTorch endpoints: an ``nn.Module`` or a function of tensors, served differentiably.

Forward with ``need_vjp`` runs under autograd and keeps the graph as the
residual; Vjp calls ``torch.autograd.grad`` on it (always retaining it, since
the client may backpropagate twice). Client-held parameters go through
``torch.func.functional_call``. Checks and messages are ``Endpoint``'s.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any, Callable, Iterator, Sequence

import grpc
import torch

from gradserve.errors import StatusError
from gradserve.frameworks.torch import ADAPTER, FROM_CODE, TO_NAME
from gradserve.server.endpoint import CERTAINLY, NO, PLAUSIBLY, Endpoint, Forwarded, Residual, \
    module_roots, own_doc, signature_of
from gradserve.wire import dtypes, pytree
from gradserve.wire.codec import Arguments
from gradserve.wire.memory import WireTensor
from gradserve.wire.specs import TensorSpec, TensorType


log = logging.getLogger("gradserve.server")


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


class _SavedBytes:
    """Counts the distinct storage bytes autograd saves during a forward.

    Storages in ``shared`` (the endpoint's own weights, which outlive every
    residual) are not charged.
    """

    def __init__(self, shared: frozenset[int]) -> None:
        self.shared = shared
        self.storages: dict[int, int] = {}

    def add(self, t: torch.Tensor) -> None:
        if t._is_zerotensor():   # autograd's symbolic zeros hold no storage
            return
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.shared:
            self.storages[storage.data_ptr()] = storage.nbytes()

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.add(t)
            # A detached alias, not ``t`` itself: an op that saves its own output
            # would otherwise form a cycle inside autograd that is never freed.
            return t.detach()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class TorchEndpoint(Endpoint):
    """Serve a torch ``nn.Module`` or function of tensors (builtins such as ``torch.sin``
    too: they take ``(*args, **kwargs)``).

    ``inputs`` declares argument specs by parameter name (checked on every
    call, reported by Describe); ``outputs`` documents output specs;
    ``batchable`` declares that the function maps over axis 0 of every tensor
    argument and output (a client's vmap then sends one call). ``debug`` adds
    tracebacks to error messages.

    A module is served through a private replica that shares its parameter
    and buffer storage (so in-place weight updates show through) but never
    changes the caller's module: the replica is in eval mode unless
    ``train=True``, its parameters do not require grad, and it lives on
    ``device`` (a copy only if the module is elsewhere; by default where the module's
    weights are, the CPU for a function). Clients may send some
    or all of its parameters by name. ``Signature`` traces it with fake tensors;
    where that fails it runs it once on zeros, if their bytes stay within
    ``max_dry_run_bytes`` (else RESOURCE_EXHAUSTED).
    """

    framework = "torch"
    partial_parameters = True
    reverse_order = 0
    forward_mode = True

    def __init__(self, fn: Callable[..., Any], *, device: str | torch.device | None = None,
                 inputs: dict[str, TensorSpec] | None = None,
                 outputs: dict[str, TensorSpec] | None = None, doc: str | None = None,
                 batchable: bool = False, train: bool = False, debug: bool = False,
                 max_dry_run_bytes: int = 64 << 20):
        if not callable(fn):
            raise TypeError(f"a torch endpoint needs a module or callable, got {type(fn).__name__}")
        self.max_dry_run_bytes = max_dry_run_bytes
        self.device = torch.device(device) if device is not None else _home(fn)
        self.module = _frozen_replica(fn) if isinstance(fn, torch.nn.Module) else None
        if self.module is not None:
            self.module.to(self.device)
            self.module.train(train)
        self.fn: Callable[..., Any] = self.module if self.module is not None else fn
        # the endpoint's own weights outlive every residual: never charged to one
        own = [*self.module.parameters(), *self.module.buffers()] if self.module is not None else []
        self._shared = frozenset(t.untyped_storage().data_ptr() for t in own)
        self._replicas = threading.local()
        self.call_signature = signature_of(self.module.forward if self.module is not None else fn)
        self.input_specs = dict(inputs or {})
        unknown = set(self.input_specs) - set(self.call_signature.parameters)
        if unknown:
            raise ValueError(f"input specs name unknown arguments {sorted(unknown)}; "
                             f"the signature is {self.call_signature}")
        self.output_specs = dict(outputs or {})
        self.doc = doc if doc is not None else own_doc(fn, ("torch.",))
        self.batchable = batchable
        self.debug = debug

    # -- description -------------------------------------------------------
    def parameters(self) -> dict[str, torch.Tensor]:
        if self.module is None:
            return {}
        return {name: p.detach() for name, p in self.module.named_parameters()}

    def accepts_parameters(self) -> bool:
        return self.module is not None

    def is_array(self, x: Any) -> bool:
        return _is_tensor(x)

    def leaf_type(self, x: Any) -> TensorType | None:
        if isinstance(x, torch.Tensor):
            return TensorType(tuple(x.shape), TO_NAME[x.dtype])
        return x if isinstance(x, TensorType) else None

    def constant(self, kind: str, name: str) -> Any:
        """As ``Endpoint.constant``; a device names where the call runs: this endpoint's
        (the caller's device means nothing here)."""
        found = super().constant(kind, name)
        return self.device if kind == "device" else found

    # -- array operations --------------------------------------------------
    def to_array(self, wire: WireTensor) -> torch.Tensor:
        t = ADAPTER.from_wire(wire).to(self.device)
        return t.requires_grad_(True) if wire.requires_grad else t

    def run_forward(self, inputs: Arguments, need_vjp: bool) -> Forwarded:
        leaves, _ = pytree.flatten(inputs.tree, _is_tensor)
        need_vjp = need_vjp and any(t.requires_grad for t in leaves)
        saved = _SavedBytes(self._shared)
        with torch.enable_grad() if need_vjp else torch.no_grad(), \
                saved.hooks() if need_vjp else contextlib.nullcontext():
            outputs = self.run(lambda: self._call(inputs))
        for path, t in pytree.flatten_with_paths(outputs, _is_tensor, "outputs"):
            problem = ADAPTER.refusal(t)
            if problem:
                raise StatusError(grpc.StatusCode.INTERNAL,
                                  f"endpoint {self.name!r} returned {path}: {problem}")
        if not need_vjp:
            return Forwarded(outputs)
        for t in (*leaves, *pytree.flatten(outputs, _is_tensor)[0]):
            saved.add(t)
        return Forwarded(outputs, Residual(outputs, inputs.tree), saved.total)

    def run_vjp(self, residual: Residual, cotangents: list[Any], batched: bool) -> Arguments:
        return self._grads(residual, cotangents, batched, keep=False)

    def run_jvp(self, inputs: Arguments, tangents: list[Any], batched: bool) -> tuple[Any, Any]:
        leaves, in_def = pytree.flatten(inputs.tree, _is_tensor)
        where = [i for i, t in enumerate(tangents) if t is not None]
        out_def: list[pytree.TreeDef] = []

        def outputs_of(*diff: torch.Tensor) -> tuple[torch.Tensor, ...]:
            values = list(leaves)
            for i, d in zip(where, diff):
                values[i] = d
            out, treedef = pytree.flatten(self._call(Arguments(*pytree.unflatten(in_def, values))),
                                          _is_tensor)
            out_def[:] = [treedef]
            return tuple(out)

        primals = tuple(leaves[i].detach() for i in where)
        given = tuple(tangents[i] for i in where)

        def forward_ad() -> tuple[Any, Any]:
            def jvp(*t: torch.Tensor) -> tuple[Any, Any]:
                outs, out_tangents = torch.func.jvp(outputs_of, primals, t)[:2]
                return outs, out_tangents

            with torch.no_grad():
                if not batched:
                    return jvp(*given)
                # a batch of tangents: the outputs computed once (torch's stub omits None)
                once = torch.func.vmap(jvp, out_dims=(None, 0))  # type: ignore[arg-type]
                return once(*given)

        try:
            outs, out_tangents = forward_ad()
        except Exception as err:
            if not (isinstance(err, (RuntimeError, NotImplementedError))
                    and any(word in str(err).lower() for word in ("forward", "vmap"))):
                def again() -> tuple[Any, Any]:
                    raise err
                outs, out_tangents = self.run(again)   # the model's own error, reported
            else:   # an op without forward AD or a vmap rule (or a dual level already
                #     open in this process): reverse mode twice
                log.debug("endpoint %r: forward AD failed (%s); a Jvp by double vjp", self.name,
                          err)
                outs, out_tangents = self.run(
                    lambda: _jvp_by_double_vjp(outputs_of, primals, given, batched))
        tangent_leaves = [t if o.is_floating_point() or o.is_complex() else None
                          for o, t in zip(outs, out_tangents)]
        return (pytree.unflatten(out_def[0], list(outs)),
                pytree.unflatten(out_def[0], tangent_leaves))

    def run_vjp_kept(self, residual: Residual, cotangents: list[Any], tree: Any,
                     batched: bool) -> Forwarded:
        saved = _SavedBytes(self._shared)
        with torch.enable_grad(), saved.hooks():
            grads = self._grads(residual, cotangents, batched, keep=True)
        state = self.kept_inputs(residual.state, tree)
        for t in (*pytree.flatten(state, _is_tensor)[0], *pytree.flatten(grads.tree, _is_tensor)[0]):
            saved.add(t)
        return Forwarded(grads.tree, Residual(grads.tree, state), saved.total)

    def _grads(self, residual: Residual, cotangents: list[Any], batched: bool,
               keep: bool) -> Arguments:
        """Gradients for the residual's flagged inputs; with ``keep``, differentiable."""
        out_leaves = pytree.flatten(residual.outputs, _is_tensor)[0]
        pairs = [(out, cot) for out, cot in zip(out_leaves, cotangents)
                 if cot is not None and out.requires_grad]
        in_leaves, in_def = pytree.flatten(residual.state, _is_tensor)
        wrt = [t for t in in_leaves if t.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(wrt)
        if pairs and wrt:
            outs, cots = zip(*pairs)
            grads = list(self.run(lambda: torch.autograd.grad(
                outs, wrt, cots, retain_graph=True, create_graph=keep, allow_unused=True,
                is_grads_batched=batched)))
        return self.mirror(in_def, [t.requires_grad for t in in_leaves], grads)

    def concat(self, parts: Sequence[Any], axis: int = 0) -> torch.Tensor:
        return torch.cat(list(parts), axis)

    def rows(self, x: Any, lo: int, hi: int, axis: int = 0, copy: bool = False) -> torch.Tensor:
        tensor: torch.Tensor = x
        part = tensor.detach().narrow(axis, lo, hi - lo)
        return part.clone() if copy else part

    def zeros(self, shape: tuple[int, ...], like: Any) -> torch.Tensor:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def run_signature(self, inputs: Arguments) -> Any:
        """Output types from fake tensors; one real dry run on zeros if tracing fails."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        def run_with(make: Callable[[TensorType], torch.Tensor]) -> Any:
            args, kwargs, parameters = pytree.map_leaves(
                make, inputs.tree, lambda x: isinstance(x, TensorType))
            with torch.no_grad():
                return self._call(Arguments(args, kwargs, parameters))

        def dtype(t: TensorType) -> torch.dtype:
            return FROM_CODE[dtypes.code_of(t.dtype)]

        try:
            with FakeTensorMode(allow_non_fake_inputs=True):
                outputs = run_with(lambda t: torch.empty(t.shape, dtype=dtype(t),
                                                         device=self.device))
        except Exception as err:
            log.debug("endpoint %r cannot be traced with fake tensors (%s: %s); running it on "
                      "zeros", self.name, type(err).__name__, err)
            nbytes = sum(dtypes.nbytes(dtypes.code_of(t.dtype), t.shape) for t in pytree.flatten(
                inputs.tree, lambda x: isinstance(x, TensorType))[0])
            if nbytes > self.max_dry_run_bytes:
                raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"endpoint {self.name!r} cannot be traced without running it "
                                  f"({type(err).__name__}: {err}), and a dry run would take "
                                  f"{nbytes} bytes of inputs, over its limit of "
                                  f"{self.max_dry_run_bytes}") from None
            outputs = self.run(lambda: run_with(
                lambda t: torch.zeros(t.shape, dtype=dtype(t), device=self.device)))
        return pytree.map_leaves(self.leaf_type, outputs, _is_tensor)

    # -- helpers -----------------------------------------------------------
    def _call(self, inputs: Arguments) -> Any:
        args, kwargs, parameters = inputs.tree
        if parameters:
            # functional_call swaps the module's attributes while it runs, so each
            # worker thread swaps on a replica of its own (sharing all storage).
            replica = getattr(self._replicas, "module", None)
            if replica is None:
                assert self.module is not None
                replica = self._replicas.module = _shared_replica(self.module)
            return torch.func.functional_call(replica, parameters, args, kwargs)
        return self.fn(*args, **kwargs)


def _shared_replica(module: torch.nn.Module,
                    parameters: dict[int, torch.nn.Parameter] | None = None) -> torch.nn.Module:
    """A copy of ``module``'s structure sharing its tensors (or using ``parameters``)."""
    memo: dict[int, Any] = {id(b): b for b in module.buffers()}
    for p in module.parameters():
        memo[id(p)] = p if parameters is None else parameters[id(p)]
    try:
        return copy.deepcopy(module, memo)
    except Exception as err:
        raise TypeError(f"cannot serve {type(module).__name__}: gradserve copies the module's "
                        f"structure (not its weights) and deepcopy failed: {err}") from err


def _frozen_replica(module: torch.nn.Module) -> torch.nn.Module:
    """A replica whose parameters share storage with ``module``'s but need no grad."""
    frozen = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False)
              for p in module.parameters()}
    return _shared_replica(module, frozen)


def _jvp_by_double_vjp(fn: Callable[..., tuple[torch.Tensor, ...]],
                       primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...],
                       batched: bool) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """``fn``'s outputs and Jacobian-vector products by reverse mode only: the vjp
    ``u -> J^T u`` is linear in ``u``, and its vjp at ``tangents`` is ``J tangents``."""
    with torch.enable_grad():
        xs = [p.detach().requires_grad_(True) for p in primals]
        outs = fn(*xs)
        wrt = [o for o in outs if o.requires_grad and (o.is_floating_point() or o.is_complex())]
        dummies = [torch.zeros_like(o, requires_grad=True) for o in wrt]
        pulled = torch.autograd.grad(wrt, xs, dummies, create_graph=True, allow_unused=True)
        pairs = [(g, t) for g, t in zip(pulled, tangents) if g is not None and g.requires_grad]
        found: Sequence[torch.Tensor | None] = [None] * len(dummies)
        if pairs:
            found = torch.autograd.grad([g for g, _ in pairs], dummies, [t for _, t in pairs],
                                        allow_unused=True, is_grads_batched=batched)
    it = iter(found)
    size = tangents[0].shape[0] if batched and tangents else None
    out_tangents = []
    for o in outs:
        t = next(it) if any(o is w for w in wrt) else None
        if t is None:
            t = torch.zeros(((size,) if size is not None else ()) + tuple(o.shape),
                            dtype=o.dtype, device=o.device)
        out_tangents.append(t.detach())
    return tuple(o.detach() for o in outs), out_tangents


def _home(fn: Any) -> torch.device:
    """Where a module's first parameter or buffer lies (the CPU for a function or a module
    without either)."""
    if isinstance(fn, torch.nn.Module):
        for t in (*fn.parameters(), *fn.buffers()):
            return t.device
    return torch.device("cpu")


def claims(obj: Any) -> int:
    """How surely ``obj`` is a torch model or function (``CERTAINLY`` for modules)."""
    if isinstance(obj, torch.nn.Module) or type(obj).__module__.startswith("torch"):
        return CERTAINLY
    return PLAUSIBLY if "torch" in module_roots(obj) else NO


def build(obj: Any, device: Any = None, **options: Any) -> TorchEndpoint:
    """A ``TorchEndpoint`` serving ``obj``."""
    return TorchEndpoint(obj, device=device, **options)
