"""PyTorch endpoints: an ``nn.Module`` or a function of tensors, served differentiably.

Forward with ``need_vjp`` runs under autograd and keeps the graph as the
residual; Vjp calls ``torch.autograd.grad`` on it (always retaining it, since
the client may backpropagate twice). Client-held parameters go through
``torch.func.functional_call``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from typing import Any, Callable

import torch

from gradserve import dtypes, pytree
from gradserve.errors import invalid
from gradserve.frameworks import WireTensor
from gradserve.frameworks.torch import ADAPTER, FROM_CODE, TO_NAME
from gradserve.server.registry import Endpoint, own_doc
from gradserve.specs import TensorSpec


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


class _Residual:
    """A forward's autograd graph: the inputs tree and the outputs tree."""

    def __init__(self, inputs: tuple, outputs: Any):
        self.inputs = inputs
        self.outputs = outputs


class _SavedBytes:
    """Counts the distinct storage bytes autograd saves during a forward.

    Storages in ``shared`` (the endpoint's own weights, which outlive every
    residual) are not charged.
    """

    def __init__(self, shared: frozenset[int]) -> None:
        self.shared = shared
        self.storages: dict[int, int] = {}

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.shared:
            self.storages[storage.data_ptr()] = storage.nbytes()

    def hooks(self) -> Any:
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.add(t)
            # A detached alias, not ``t`` itself: an op that saves its own output
            # would otherwise form a cycle inside autograd that is never freed.
            return t.detach()
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class TorchEndpoint(Endpoint):
    """Serve a torch ``nn.Module`` or function of tensors.

    ``inputs`` declares argument specs by parameter name (checked on every
    call, reported by Describe); ``outputs`` documents output specs;
    ``batchable`` declares that the function maps over axis 0 of every tensor
    argument and output (a client's vmap then sends one call). ``debug`` adds
    tracebacks to error messages.

    A module is served through a private replica that shares its parameter
    and buffer storage (so in-place weight updates show through) but never
    changes the caller's module: the replica is in eval mode unless
    ``train=True``, its parameters do not require grad, and it lives on
    ``device`` (a copy only if the module is elsewhere).
    """

    framework = "torch"

    def __init__(self, fn: Callable[..., Any], *, device: str | torch.device | None = None,
                 inputs: dict[str, TensorSpec] | None = None,
                 outputs: dict[str, TensorSpec] | None = None, doc: str | None = None,
                 batchable: bool = False, train: bool = False, debug: bool = False):
        if not callable(fn):
            raise TypeError(f"a torch endpoint needs a module or callable, got {type(fn).__name__}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.module = _frozen_replica(fn) if isinstance(fn, torch.nn.Module) else None
        if self.module is not None:
            self.module.to(self.device)
            self.module.train(train)
        self.fn = self.module if self.module is not None else fn
        # the endpoint's own weights outlive every residual: never charged to one
        own = [*self.module.parameters(), *self.module.buffers()] if self.module is not None else []
        self._shared = frozenset(t.untyped_storage().data_ptr() for t in own)
        self._replicas = threading.local()
        self.call_signature = inspect.signature(fn.forward if self.module is not None else fn)
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

    def parameter_specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec(tuple(p.shape), TO_NAME[p.dtype])
                for name, p in self.parameters().items()}

    def accepts_parameters(self) -> bool:
        return self.module is not None

    def leaf_spec(self, x: Any) -> TensorSpec | None:
        if isinstance(x, torch.Tensor):
            return TensorSpec(tuple(x.shape), TO_NAME[x.dtype])
        return x if isinstance(x, TensorSpec) else None

    # -- calls -------------------------------------------------------------
    def make_leaf(self, wire: WireTensor, path: str) -> torch.Tensor:
        t = ADAPTER.from_wire(wire).to(self.device)
        if wire.requires_grad:
            if wire.dtype not in dtypes.DIFFERENTIABLE:
                raise invalid(f"{path}: requires_grad on a {dtypes.name_of(wire.dtype)} "
                              "tensor; only floating and complex tensors have gradients")
            t.requires_grad_(True)
        return t

    def forward(self, args: tuple, kwargs: dict, parameters: dict | None,
                need_vjp: bool) -> tuple[Any, Any, int]:
        self.check_arguments(args, kwargs)
        if parameters is not None:
            self._check_parameters(parameters)
        inputs = (args, kwargs, parameters)
        leaves, _ = pytree.flatten(inputs, _is_tensor)
        need_vjp = need_vjp and any(t.requires_grad for t in leaves)
        saved = _SavedBytes(self._shared)
        with torch.enable_grad() if need_vjp else torch.no_grad(), \
                saved.hooks() if need_vjp else contextlib.nullcontext():
            outputs = self.run(lambda: self._call(args, kwargs, parameters))
        if not need_vjp:
            return outputs, None, 0
        for t in (*leaves, *pytree.flatten(outputs, _is_tensor)[0]):
            saved.add(t)
        return outputs, _Residual(inputs, outputs), saved.total

    def vjp(self, residual: _Residual, cotangents: Any, batched: bool = False) -> tuple[Any, Any, Any]:
        out_leaves, cot_leaves = self.align_cotangents(residual.outputs, cotangents, _is_tensor)
        outs, cots = [], []
        batch = None
        for i, (out, cot) in enumerate(zip(out_leaves, cot_leaves)):
            if cot is None:
                continue
            if not isinstance(cot, torch.Tensor):
                raise invalid(f"cotangent for output tensor #{i} must be a tensor or None, "
                              f"got {type(cot).__name__}")
            shape = tuple(cot.shape[1:]) if batched else tuple(cot.shape)
            if shape != tuple(out.shape) or cot.dtype != out.dtype or (batched and cot.dim() == 0):
                want = f"{TO_NAME[out.dtype]}{[*(['B'] if batched else []), *out.shape]}"
                raise invalid(f"cotangent for output tensor #{i}: expected {want}, got "
                              f"{TO_NAME.get(cot.dtype, cot.dtype)}{list(cot.shape)}")
            if batched:
                if cot.shape[0] == 0:
                    raise invalid("batched cotangents need a batch of at least one")
                if batch is not None and cot.shape[0] != batch:
                    raise invalid(f"batched cotangents disagree on the batch size "
                                  f"({batch} and {cot.shape[0]})")
                batch = cot.shape[0]
            if out.requires_grad:
                outs.append(out)
                cots.append(cot)
        in_leaves, in_def = pytree.flatten(residual.inputs, _is_tensor)
        wrt = [t for t in in_leaves if t.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(wrt)
        if outs and wrt:
            grads = list(self.run(lambda: torch.autograd.grad(
                outs, wrt, cots, retain_graph=True, allow_unused=True, is_grads_batched=batched)))
        by_leaf = iter(grads)
        return pytree.unflatten(in_def, [next(by_leaf) if t.requires_grad else None
                                         for t in in_leaves])

    def signature(self, args: tuple, kwargs: dict, parameters: Any) -> Any:
        """Output specs from fake tensors; one real dry run on zeros if tracing fails."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.check_arguments(args, kwargs)
        if parameters is not None:
            self._check_parameters(parameters)

        def run_with(make: Callable[[TensorSpec], torch.Tensor]) -> Any:
            inputs = pytree.map_leaves(make, (args, kwargs, parameters),
                                       lambda x: isinstance(x, TensorSpec))
            with torch.no_grad():
                return self._call(*inputs)

        def empty(spec: TensorSpec) -> torch.Tensor:
            return torch.empty(spec.shape, dtype=FROM_CODE[dtypes.code_of(spec.dtype)],
                               device=self.device)

        try:
            with FakeTensorMode(allow_non_fake_inputs=True):
                outputs = run_with(empty)
        except Exception:
            outputs = self.run(lambda: run_with(
                lambda s: torch.zeros(s.shape, dtype=FROM_CODE[dtypes.code_of(s.dtype)],
                                      device=self.device)))
        return pytree.map_leaves(self.leaf_spec, outputs, _is_tensor)

    # -- helpers -----------------------------------------------------------
    def _call(self, args: tuple, kwargs: dict, parameters: dict | None) -> Any:
        if parameters:
            # functional_call swaps the module's attributes while it runs, so each
            # worker thread swaps on a replica of its own (sharing all storage).
            replica = getattr(self._replicas, "module", None)
            if replica is None:
                replica = self._replicas.module = _shared_replica(self.module)
            return torch.func.functional_call(replica, parameters, args, kwargs)
        return self.fn(*args, **kwargs)

    def _check_parameters(self, parameters: Any) -> None:
        if self.module is None:
            raise invalid(f"endpoint {self.name!r} is a function and takes no parameters")
        if not isinstance(parameters, dict):
            raise invalid("parameters must be a dict of name -> tensor")
        own = self.parameter_specs()
        for name, value in parameters.items():
            if name not in own:
                raise invalid(f"parameter {name!r} is not a parameter of endpoint {self.name!r}")
            got = self.leaf_spec(value)
            if got is None or got != own[name]:
                shown = f"{got.dtype}{list(got.shape)}" if got else type(value).__name__
                raise invalid(f"parameter {name!r}: expected {own[name].dtype}"
                              f"{list(own[name].shape)}, got {shown}")


def _shared_replica(module: torch.nn.Module, parameters: dict | None = None) -> torch.nn.Module:
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
