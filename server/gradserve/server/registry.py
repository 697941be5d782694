"""The endpoint registry and the interface every framework's endpoint implements."""

from __future__ import annotations

import inspect
import threading
import traceback
from abc import ABC, abstractmethod
from typing import Any, Callable

import grpc

from gradserve import pytree
from gradserve.errors import StatusError, invalid
from gradserve.frameworks import WireTensor
from gradserve.specs import TensorSpec
from gradserve.v1 import gradserve_pb2 as pb


class Endpoint(ABC):
    """A differentiable function hosted by the server.

    Subclasses (one module per framework) turn wire tensors into their arrays,
    run the function keeping what backward needs, and compute VJPs.
    """

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
    batchable: bool = False

    def info(self) -> pb.EndpointInfo:
        """Static description for ListEndpoints/Describe."""
        return pb.EndpointInfo(
            name=self.name, framework=self.framework, device=str(self.device),
            signature=f"{self.name}{self.call_signature}", doc=self.doc,
            inputs=[spec.to_pb(name) for name, spec in self.input_specs.items()],
            outputs=[spec.to_pb(name) for name, spec in self.output_specs.items()],
            parameters=[spec.to_pb(name) for name, spec in self.parameter_specs().items()],
            accepts_parameters=self.accepts_parameters(), batchable=self.batchable)

    @abstractmethod
    def parameter_specs(self) -> dict[str, TensorSpec]:
        """Shapes and dtypes of the endpoint's own parameters, by (path) name."""

    def accepts_parameters(self) -> bool:
        """Whether a client may send its own parameters."""
        return bool(self.parameter_specs())

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """The endpoint's own parameters, by name (arrays of its framework)."""

    @abstractmethod
    def make_leaf(self, wire: WireTensor, path: str) -> Any:
        """An input array, on the endpoint's device, tracking grad if flagged."""

    @abstractmethod
    def forward(self, args: tuple, kwargs: dict, parameters: dict | None,
                need_vjp: bool) -> tuple[Any, Any, int]:
        """Run the function: (outputs, residual or None, residual bytes)."""

    @abstractmethod
    def vjp(self, residual: Any, cotangents: Any, batched: bool = False) -> tuple[Any, Any, Any]:
        """Gradients (args, kwargs, parameters) for the inputs flagged at forward.

        With ``batched`` every cotangent (and gradient) has an extra leading axis.
        """

    @abstractmethod
    def signature(self, args: tuple, kwargs: dict, parameters: Any) -> Any:
        """Output specs for inputs whose tensors may be :class:`TensorSpec` leaves."""

    @abstractmethod
    def leaf_spec(self, x: Any) -> TensorSpec | None:
        """Shape and dtype of an input leaf, or None if it is no tensor."""

    # -- shared helpers ----------------------------------------------------
    def check_arguments(self, args: tuple, kwargs: dict) -> None:
        """INVALID_ARGUMENT naming the argument unless the call fits the signature and specs."""
        try:
            bound = self.call_signature.bind(*args, **kwargs)
        except TypeError as err:
            raise invalid(f"endpoint {self.name!r}{self.call_signature}: {err}") from None
        for name, spec in self.input_specs.items():
            if name not in bound.arguments:
                continue
            got = self.leaf_spec(bound.arguments[name])
            if got is None:
                raise invalid(f"argument {name!r}: expected a tensor {spec}, got "
                              f"{type(bound.arguments[name]).__name__}")
            problem = spec.mismatch(got.shape, got.dtype)
            if problem:
                raise invalid(f"argument {name!r}: {problem}")

    @staticmethod
    def align_cotangents(outputs: Any, cotangents: Any,
                         is_array: Callable[[Any], bool]) -> tuple[list, list]:
        """(output arrays, their cotangents) in flatten order; INVALID_ARGUMENT on a mismatch."""
        out_leaves, out_def = pytree.flatten(outputs, is_array)
        try:
            return out_leaves, pytree.flatten_up_to(out_def, cotangents, "cotangents")
        except ValueError as err:
            raise invalid(f"{err} (cotangents must mirror the outputs)") from None

    def run(self, thunk: Callable[[], Any]) -> Any:
        """Run model code; its exceptions become INTERNAL naming the endpoint."""
        try:
            return thunk()
        except StatusError:
            raise
        except Exception as err:
            message = f"endpoint {self.name!r} raised {type(err).__name__}: {err}"
            if self.debug:
                message += "\n" + traceback.format_exc()
            raise StatusError(grpc.StatusCode.INTERNAL, message) from None


def own_doc(fn: Any, library_prefixes: tuple[str, ...] = ()) -> str:
    """The first paragraph of ``fn``'s docstring, unless a library (not the user) wrote it."""
    owner = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
    if getattr(owner, "__module__", "").startswith(library_prefixes):
        return ""
    return (inspect.getdoc(fn) or "").split("\n\n")[0]


class Registry:
    """Endpoints by name; thread-safe."""

    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = threading.Lock()

    def add(self, name: str, endpoint: Endpoint) -> Endpoint:
        if not name or not isinstance(name, str):
            raise ValueError(f"endpoint name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._endpoints:
                raise ValueError(f"an endpoint named {name!r} is already registered")
            if endpoint in self._endpoints.values():
                raise ValueError(f"this endpoint is already registered as {endpoint.name!r}; "
                                 "create a second one to serve it under another name")
            endpoint.name = name
            self._endpoints[name] = endpoint
        return endpoint

    def get(self, name: str) -> Endpoint:
        with self._lock:
            endpoint = self._endpoints.get(name)
            known = sorted(self._endpoints)
        if endpoint is None:
            raise StatusError(grpc.StatusCode.NOT_FOUND,
                              f"no endpoint named {name!r}; this server has: {', '.join(known) or 'none'}")
        return endpoint

    def all(self) -> list[Endpoint]:
        with self._lock:
            return list(self._endpoints.values())
