"""The ``Endpoint`` interface: everything about a served function that is not framework math.

An endpoint checks each call against its signature and declared specs, the
parameters a client sends against its own, and cotangents against the
outputs they belong to, with one set of messages for every framework. A
framework's subclass (``torch_endpoint``, ``jax_endpoint``) adds only array
operations: turning wire tensors into its arrays, running the function
keeping what backward needs, and computing vector-Jacobian products.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

import grpc

from gradserve.errors import DERIVATIVE_UNSUPPORTED, StatusError, invalid
from gradserve.frameworks import FRAMEWORKS, adapter, framework
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import dtypes, pytree
from gradserve.wire.codec import Arguments
from gradserve.wire.memory import WireTensor
from gradserve.wire.specs import TensorSpec, TensorType


@dataclass
class Residual:
    """What a forward kept for its backward: the outputs, the framework's own state, and
    the instance (of the endpoint's, one per device) that made it and runs its Vjp."""

    outputs: Any
    state: Any
    instance: int = 0


@dataclass
class Forwarded:
    """What ``Endpoint.forward`` produced: outputs, and (when asked for and some input
    needs grad) the residual with the bytes it holds beyond the endpoint's own weights."""

    outputs: Any
    residual: Residual | None = None
    nbytes: int = 0


log = logging.getLogger("gradserve.server")

#: How strongly a framework claims a Python object: not at all, by the modules its
#: code uses, or by its type (a module, a jitted function).
NO, PLAUSIBLY, CERTAINLY = 0, 1, 2


def module_roots(fn: Any) -> set[str]:
    """Top-level modules a function's code refers to (its globals and its own module)."""
    roots = {getattr(v, "__name__", "").partition(".")[0]
             for v in getattr(fn, "__globals__", {}).values() if inspect.ismodule(v)}
    roots.add(str(getattr(fn, "__module__", "") or "").partition(".")[0])
    return roots


def signature_of(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s call signature, its string annotations resolved where they can be (shown
    as ``x: torch.Tensor``, not ``x: 'torch.Tensor'``); ``(*args, **kwargs)`` for builtins
    that have none."""
    try:
        try:
            return inspect.signature(fn, eval_str=True)
        except Exception:   # an annotation naming what the module cannot resolve
            return inspect.signature(fn)
    except (TypeError, ValueError):
        return inspect.Signature([
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


def own_doc(fn: Any, library_prefixes: tuple[str, ...] = ()) -> str:
    """The first paragraph of ``fn``'s docstring, unless a library (not the user) wrote it."""
    owner = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
    if getattr(owner, "__module__", "").startswith(library_prefixes) or inspect.isbuiltin(fn):
        return ""
    return (inspect.getdoc(fn) or "").split("\n\n")[0]


class Endpoint(ABC):
    """A differentiable function hosted by the server."""

    framework: str = ""
    name: str = ""
    debug: bool = False
    #: The call signature clients see (checked on every call).
    call_signature: inspect.Signature
    #: Declared input specs by argument name (checked) and output specs (documentation).
    input_specs: dict[str, TensorSpec]
    output_specs: dict[str, TensorSpec]
    doc: str = ""
    device: Any = "cpu"
    #: its index among the instances of its name (one per device; ``Instances`` sets it)
    instance: int = 0
    batchable: bool = False
    #: dynamic batching (``Server.add`` sets them for batchable endpoints): most rows one
    #: merged run takes (0: never merge calls), longest a call waits for others (seconds)
    max_batch: int = 0
    max_delay: float = 0.0
    #: whether merged runs are padded to a power-of-two number of rows (a framework that
    #: compiles once per shape: a few sizes, not one per sum of callers' rows)
    pad_batches: bool = False
    #: whether a client may send some of the parameters (by name) rather than all
    partial_parameters: bool = False
    #: highest order of reverse mode it serves (0: any; ``run_vjp_kept`` makes order 2+)
    reverse_order: int = 1
    #: whether it serves forward mode (``run_jvp``)
    forward_mode: bool = False

    # -- framework math: what a subclass implements ------------------------
    @abstractmethod
    def parameters(self) -> Any:
        """The endpoint's own parameters: a pytree of its arrays (``{}`` for none)."""

    @abstractmethod
    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is an array of this framework (an output leaf)."""

    @abstractmethod
    def leaf_type(self, x: Any) -> TensorType | None:
        """The type of an input leaf or output array (``TensorType`` leaves are their own
        type), or None if it is no tensor."""

    @abstractmethod
    def to_array(self, wire: WireTensor) -> Any:
        """An input array on the endpoint's device, tracking grad if ``wire`` asks."""

    @abstractmethod
    def run_forward(self, inputs: Arguments, need_vjp: bool) -> Forwarded:
        """Run the function on checked inputs."""

    @abstractmethod
    def run_vjp(self, residual: Residual, cotangents: list[Any], batched: bool) -> Arguments:
        """Gradients for the inputs flagged at forward; ``cotangents`` are checked and
        aligned with the output arrays (None where none was given)."""

    def run_jvp(self, inputs: Arguments, tangents: list[Any], batched: bool) -> tuple[Any, Any]:
        """The outputs and their tangents (mirroring them, None where an output has none)
        for checked ``tangents`` aligned with the input arrays (None where none)."""
        raise StatusError(grpc.StatusCode.UNIMPLEMENTED,
                          f"endpoint {self.name!r} ({self.framework}) serves no forward mode "
                          "(Jvp)", DERIVATIVE_UNSUPPORTED)

    def run_vjp_kept(self, residual: Residual, cotangents: list[Any], tree: Any,
                     batched: bool) -> Forwarded:
        """As ``run_vjp``, keeping the graph: the gradients (a tuple ``(args, kwargs,
        parameters)``) as outputs, and the residual of the call ``kept_inputs(residual,
        tree)`` that made them (``tree``: the cotangents as received)."""
        raise StatusError(grpc.StatusCode.UNIMPLEMENTED,
                          f"endpoint {self.name!r} ({self.framework}) serves first-order "
                          "reverse mode only: its gradients cannot be differentiated again",
                          DERIVATIVE_UNSUPPORTED)

    @abstractmethod
    def run_signature(self, inputs: Arguments) -> Any:
        """Outputs, with ``TensorType`` leaves, for inputs whose tensors are ``TensorType``."""

    @abstractmethod
    def concat(self, parts: Sequence[Any], axis: int = 0) -> Any:
        """Input or cotangent arrays (as ``to_array`` makes them) joined along ``axis``; the
        result is differentiated where the parts are (dynamic batching merges calls so)."""

    @abstractmethod
    def zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        """Zeros of ``shape`` with the dtype and device of ``like`` (an output array: a
        cotangent; an input array: padding rows), not differentiated."""

    def rows(self, x: Any, lo: int, hi: int, axis: int = 0, copy: bool = False) -> Any:
        """Rows ``lo:hi`` along ``axis`` of an output or gradient array, with no autograd
        history (dynamic batching splits merged results so); with ``copy``, memory of their
        own rather than a view."""
        part = x[(slice(None),) * axis + (slice(lo, hi),)]
        return part.copy() if copy else part

    def refuse_dtype(self, code: int) -> str:
        """Why inputs of wire dtype ``code`` cannot be used here ("" when they can)."""
        return ""

    def accepts_parameters(self) -> bool:
        """Whether a client may send its own parameters."""
        return bool(pytree.flatten(self.parameters(), self.is_array)[0])

    # -- what every endpoint does alike ------------------------------------
    def forward(self, inputs: Arguments, need_vjp: bool) -> Forwarded:
        """Check a call and run it."""
        self.check_arguments(inputs)
        return self.run_forward(inputs, need_vjp)

    def vjp(self, residual: Residual, cotangents: Any, batched: bool = False) -> Arguments:
        """Gradients mirroring the inputs (None where none was asked for). With
        ``batched`` every cotangent (and gradient) has an extra leading axis."""
        return self.run_vjp(residual, self.check_cotangents(residual.outputs, cotangents, batched),
                            batched)

    def jvp(self, inputs: Arguments, tangents: Arguments, batched: bool = False
            ) -> tuple[Any, Any]:
        """Check a call and its tangents and run it in forward mode: the outputs and their
        tangents. With ``batched`` every tangent (and output tangent) has an extra leading
        axis."""
        self.check_arguments(inputs)
        return self.run_jvp(inputs, self.check_tangents(inputs, tangents, batched), batched)

    def vjp_kept(self, residual: Residual, cotangents: Any, batched: bool = False) -> Forwarded:
        """A Vjp whose gradients are differentiable again: them, and the residual for them."""
        made = self.run_vjp_kept(residual,
                                 self.check_cotangents(residual.outputs, cotangents, batched),
                                 cotangents, batched)
        if made.residual is not None:
            made.residual.instance = residual.instance
        return made

    def signature(self, inputs: Arguments) -> Any:
        """Output types for inputs whose tensors may be ``TensorType`` leaves."""
        self.check_arguments(inputs)
        return self.run_signature(inputs)

    def constant(self, kind: str, name: str) -> Any:
        """A received dtype, device, memory format or layout as this framework's object
        (codec's ``Statics``)."""
        return adapter(self.framework).constant(kind, name)

    def named(self, type_name: str, fields: tuple[str, ...], items: list[Any]) -> Any:
        """A received named tuple as this framework has it (codec's ``Statics``)."""
        return adapter(self.framework).named(type_name, fields, items)

    def make_leaf(self, wire: WireTensor, path: str) -> Any:
        """A received input tensor as this framework's array (``codec`` calls it)."""
        if wire.requires_grad and wire.dtype not in dtypes.DIFFERENTIABLE:
            raise invalid(f"{path}: requires_grad on a {dtypes.name_of(wire.dtype)} tensor; "
                          "only floating and complex tensors have gradients")
        problem = self.refuse_dtype(wire.dtype)
        if problem:
            raise invalid(f"{path}: {problem}")
        return self.to_array(wire)

    def info(self) -> pb.EndpointInfo:
        """Static description for ListEndpoints/Describe."""
        return pb.EndpointInfo(
            name=self.name, framework=self.framework, device=str(self.device),
            signature=f"{self.name}{self.call_signature}", doc=self.doc,
            inputs=[spec.to_pb(name) for name, spec in self.input_specs.items()],
            outputs=[spec.to_pb(name) for name, spec in self.output_specs.items()],
            parameters=[t.to_pb(name) for name, t in self.parameter_types().items()],
            accepts_parameters=self.accepts_parameters(), batchable=self.batchable,
            batching=pb.Batching(max_batch=self.max_batch, max_delay_seconds=self.max_delay),
            derivatives=pb.Derivatives(reverse_order=self.reverse_order,
                                       forward=self.forward_mode))

    def parameter_types(self) -> dict[str, TensorType]:
        """Types of the endpoint's own parameters, by name (a flat dict's keys, else paths)."""
        own = self.parameters()
        flat = isinstance(own, dict) and all(self.is_array(v) for v in own.values())
        named = own.items() if flat else pytree.flatten_with_paths(own, self.is_array)
        types = {}
        for name, leaf in named:
            t = self.leaf_type(leaf)
            assert t is not None
            types[name] = t
        return types

    @functools.cached_property
    def _fitting(self) -> set[tuple[int, tuple[str, ...]]]:
        """Argument counts and keyword names seen to fit the signature."""
        return set()

    def check_arguments(self, inputs: Arguments) -> None:
        """INVALID_ARGUMENT naming the argument unless the call fits the signature, the
        declared specs and (if sent) the endpoint's parameters."""
        shape = (len(inputs.args), tuple(inputs.kwargs))
        if self.input_specs or shape not in self._fitting:   # binding is slow; it depends
            try:                                              # on the shape alone
                bound = self.call_signature.bind(*inputs.args, **inputs.kwargs)
            except TypeError as err:
                raise invalid(f"endpoint {self.name!r}{self.call_signature}: {err}") from None
            if len(self._fitting) < 64:
                self._fitting.add(shape)
            for name, spec in self.input_specs.items():
                if name not in bound.arguments:
                    continue
                got = self.leaf_type(bound.arguments[name])
                if got is None:
                    raise invalid(f"argument {name!r}: expected a tensor {spec}, got "
                                  f"{type(bound.arguments[name]).__name__}")
                problem = spec.mismatch(got)
                if problem:
                    raise invalid(f"argument {name!r}: {problem}")
        if inputs.parameters is not None:
            self.check_parameters(inputs.parameters)

    def check_parameters(self, parameters: Any) -> None:
        """INVALID_ARGUMENT naming the parameter unless ``parameters`` mirror the
        endpoint's own (or, where partial parameters are allowed, some of them by name)."""
        if not self.accepts_parameters():
            raise invalid(f"endpoint {self.name!r} takes no parameters: it is called with its "
                          "arguments only")
        own = self.parameters()
        if self.partial_parameters:
            if not isinstance(parameters, dict):
                raise invalid("parameters must be a dict of name -> tensor, got "
                              f"{type(parameters).__name__}")
            for key in parameters:
                if key not in own:
                    raise invalid(f"parameters[{key!r}] is not a parameter of endpoint "
                                  f"{self.name!r}")
            pairs = [(f"parameters[{k!r}]", own[k], v) for k, v in parameters.items()]
        else:
            leaves, treedef = pytree.flatten(own, self.is_array)
            try:
                sent = pytree.flatten_up_to(treedef, parameters, "parameters")
            except ValueError as err:
                raise invalid(f"{err} (parameters must mirror the endpoint's own)") from None
            paths = [f"parameters{p}" for p, _ in pytree.flatten_with_paths(own, self.is_array)]
            pairs = list(zip(paths, leaves, sent))
        for path, mine, theirs in pairs:
            want, got = self.leaf_type(mine), self.leaf_type(theirs)
            if got != want:
                shown = str(got) if got is not None else type(theirs).__name__
                raise invalid(f"{path}: expected {want}, got {shown}")

    def check_cotangents(self, outputs: Any, cotangents: Any, batched: bool) -> list[Any]:
        """Cotangents aligned with the output arrays (None where none was given or the
        output is not differentiable); INVALID_ARGUMENT naming the first that does not fit."""
        out_leaves, out_def = pytree.flatten(outputs, self.is_array)
        try:
            given = pytree.flatten_up_to(out_def, cotangents, "cotangents")
        except ValueError as err:
            raise invalid(f"{err} (cotangents must mirror the outputs)") from None
        return self._aligned("cotangent", "output", out_leaves, given, batched, strict=False)

    def check_tangents(self, inputs: Arguments, tangents: Arguments, batched: bool) -> list[Any]:
        """Tangents aligned with the input arrays of ``inputs`` (None where none was
        given); INVALID_ARGUMENT naming the first that does not fit or belongs to an input
        without derivatives (an integer tensor)."""
        in_leaves, in_def = pytree.flatten(inputs.tree, self._is_input)
        try:
            given = pytree.flatten_up_to(in_def, tangents.tree, "tangents")
        except ValueError as err:
            raise invalid(f"{err} (tangents must mirror the inputs)") from None
        return self._aligned("tangent", "input", in_leaves, given, batched, strict=True)

    def _is_input(self, x: Any) -> bool:
        return self.leaf_type(x) is not None

    def _aligned(self, kind: str, of: str, leaves: list[Any], given: list[Any], batched: bool,
                 strict: bool) -> list[Any]:
        """``given`` (cotangents or tangents) checked against ``leaves`` (the outputs or
        inputs they belong to): None kept; one for a non-differentiable array refused with
        ``strict``, else dropped."""
        batch = None
        aligned: list[Any] = []
        for i, (leaf, value) in enumerate(zip(leaves, given)):
            if value is None:
                aligned.append(None)
                continue
            want, got = self.leaf_type(leaf), self.leaf_type(value)
            assert want is not None
            if got is None:
                raise invalid(f"{kind} for {of} tensor #{i} must be a tensor or None, "
                              f"got {type(value).__name__}")
            shape = got.shape[1:] if batched else got.shape
            if shape != want.shape or got.dtype != want.dtype or (batched and not got.shape):
                dims = [*(["B"] if batched else []), *want.shape]
                raise invalid(f"{kind} for {of} tensor #{i}: expected {want.dtype}{dims}, "
                              f"got {got}")
            if batched:
                if got.shape[0] == 0:
                    raise invalid(f"batched {kind}s need a batch of at least one")
                if batch is not None and got.shape[0] != batch:
                    raise invalid(f"batched {kind}s disagree on the batch size ({batch} "
                                  f"and {got.shape[0]})")
                batch = got.shape[0]
            differentiable = dtypes.code_of(want.dtype) in dtypes.DIFFERENTIABLE
            if strict and not differentiable:
                raise invalid(f"{kind} for {of} tensor #{i}: a {want.dtype} {of} has no "
                              f"{kind}s (only floating and complex tensors do)")
            aligned.append(value if differentiable else None)
        return aligned

    @staticmethod
    def kept_inputs(state: Any, cotangents: Any) -> Any:
        """The inputs tree of a kept Vjp of a call whose inputs tree is ``state``:
        ``((args, kwargs, parameters, cotangents), {}, {})``."""
        args, kwargs, parameters = state
        return (args, kwargs, parameters, cotangents), {}, {}

    @staticmethod
    def mirror(treedef: pytree.TreeDef, flags: Sequence[bool], grads: Iterable[Any]) -> Arguments:
        """Gradients shaped like the call ``treedef`` describes: the next of ``grads`` for
        each flagged leaf, None for the others."""
        it = iter(grads)
        args, kwargs, parameters = pytree.unflatten(treedef, [next(it) if f else None
                                                              for f in flags])
        return Arguments(args, kwargs, parameters)

    def run(self, thunk: Callable[[], Any]) -> Any:
        """Run model code; its exceptions become INTERNAL naming the endpoint (logged at
        ERROR with their traceback here; the client gets it only with ``debug``)."""
        try:
            return thunk()
        except StatusError:
            raise
        except Exception as err:
            message = f"endpoint {self.name!r} raised {type(err).__name__}: {err}"
            log.error("%s", message, exc_info=True)   # the traceback stays on the server
            if self.debug:
                message += "\n" + traceback.format_exc()
            raise StatusError(grpc.StatusCode.INTERNAL, message) from None


def endpoint_module(name: str) -> ModuleType:
    """The server module of framework ``name`` (with ``claims``, ``build`` and its Endpoint)."""
    return importlib.import_module(framework(name).endpoint)


def build_endpoint(obj: Any, device: Any = None, framework_name: str | None = None,
                   **options: Any) -> Endpoint:
    """An endpoint serving ``obj`` (a module or a function): with the framework named, or
    the one that claims it most strongly ("is this yours?"), among those loaded."""
    if isinstance(obj, Endpoint):
        given = [*(["device"] if device is not None else []), *sorted(options)]
        if given:
            raise TypeError(f"{', '.join(given)} given with a {type(obj).__name__}, which has "
                            "its own: pass them to its constructor")
        return obj
    if framework_name is None:
        loaded = [fw for fw in FRAMEWORKS
                  if fw.endpoint and any(root in sys.modules for root in fw.roots)]
        if not loaded:
            raise TypeError(f"cannot tell which framework should serve {obj!r}: none is "
                            "imported (wrap it in TorchEndpoint or JaxEndpoint)")
        strengths = [(endpoint_module(fw.name).claims(obj), -i, fw.name)
                     for i, fw in enumerate(loaded)]
        framework_name = max(strengths)[2]
    built: Endpoint = endpoint_module(framework_name).build(obj, device=device, **options)
    return built
