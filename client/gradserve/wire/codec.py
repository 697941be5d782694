"""The wire codec: Python pytrees <-> ``gradserve.v1.Value`` messages.

Array leaves of any framework (found by :func:`gradserve.frameworks.adapter_for`)
become ``Tensor`` messages whose payload the framing fills in
(:class:`PayloadWriter`) and reads back (:class:`PayloadReader`); static
leaves travel as scalars. Nothing is pickled. A call's three parts (positional
arguments, keyword arguments, parameters) travel as one :class:`Arguments`;
gradients mirror them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from gradserve import frameworks
from gradserve.errors import invalid
from gradserve.frameworks import Statics
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import pytree
from gradserve.wire.memory import Data, WireTensor
from gradserve.wire.specs import TensorSpec, TensorType

_INT64 = (-(2**63), 2**63 - 1)
#: Containers a pytree may nest (each level is two protobuf messages; protobuf parses 100).
MAX_DEPTH = 32

#: Turns a received wire tensor (and its path, for messages) into an array.
MakeLeaf = Callable[[WireTensor, str], Any]


class PayloadWriter(Protocol):
    """Where the codec puts each tensor's bytes (the framing's ``FrameWriter``)."""

    def put(self, msg: pb.Tensor, data: Data) -> None:
        """Set ``msg``'s payload so the receiver can recover ``data``."""


class PayloadReader(Protocol):
    """Where the codec gets each tensor's bytes (the framing's ``FrameReader``)."""

    def get(self, msg: pb.Tensor) -> Data:
        """The validated bytes designated by ``msg``'s payload."""


@dataclass(frozen=True)
class Arguments:
    """A call's inputs — positional, keyword, and the endpoint's parameters (None: its
    own) — or the gradients, which mirror them (None where none was asked for)."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    parameters: Any = None

    @property
    def tree(self) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        """``(args, kwargs, parameters)`` as one pytree."""
        return self.args, self.kwargs, self.parameters


def encode(tree: Any, writer: PayloadWriter,
           requires_grad: Callable[[Any], bool] | None = None, path: str = "") -> pb.Value:
    """Encode a pytree; ``requires_grad(leaf)`` flags tensors to differentiate."""
    value = pb.Value()
    _encode_into(value, tree, writer, requires_grad, path)
    return value


def encode_into(value: pb.Value, tree: Any, writer: PayloadWriter,
                requires_grad: Callable[[Any], bool] | None = None, path: str = "") -> None:
    """Encode a pytree into an empty ``Value`` field of a message (no copy of its bytes)."""
    value.SetInParent()
    _encode_into(value, tree, writer, requires_grad, path)


def _encode_into(value: pb.Value, node: Any, writer: PayloadWriter,
                 requires_grad: Callable[[Any], bool] | None, path: str, depth: int = 0) -> None:
    adapter = frameworks.adapter_for(node)
    if adapter is not None:
        try:
            wire = adapter.to_wire(node)
        except TypeError as err:
            raise TypeError(f"{path or 'value'}: {err}") from None
        msg = value.tensor
        msg.dtype = wire.dtype
        msg.shape.extend(wire.shape)
        msg.requires_grad = bool(requires_grad and requires_grad(node))
        writer.put(msg, wire.data)
    elif isinstance(node, (TensorType, TensorSpec)):
        concrete = node if isinstance(node, TensorType) else node.concrete()
        if concrete is None:
            raise TypeError(f"{path or 'value'}: an abstract tensor needs a dtype and every "
                            f"dimension, got {node}")
        value.abstract.CopyFrom(concrete.to_pb())
    elif node is None:
        value.none.SetInParent()
    elif isinstance(node, bool):
        value.bool_value = node
    elif isinstance(node, int):
        if not _INT64[0] <= node <= _INT64[1]:
            raise TypeError(f"{path or 'value'}: integer {node} does not fit in int64")
        value.int_value = node
    elif isinstance(node, float):
        value.float_value = node
    elif isinstance(node, complex):
        value.complex_value.real, value.complex_value.imag = node.real, node.imag
    elif isinstance(node, str):
        value.str_value = node
    elif node is Ellipsis:
        value.ellipsis.SetInParent()
    elif isinstance(node, slice):
        value.slice_value.SetInParent()
        for part in ("start", "stop", "step"):
            if getattr(node, part) is not None:
                _encode_into(getattr(value.slice_value, part), getattr(node, part), writer,
                             requires_grad, f"{path}.{part}")
    elif depth >= MAX_DEPTH and isinstance(node, (dict, tuple, list)):
        raise TypeError(f"{path or 'value'}: pytrees nest at most {MAX_DEPTH} containers deep "
                        "(protobuf's limit on nested messages)")
    elif isinstance(node, dict):
        mapping = value.dict_value
        mapping.SetInParent()
        for key, item in node.items():
            if not isinstance(key, str):
                raise TypeError(f"{path or 'value'}: dict keys must be str, got {type(key).__name__}")
            mapping.keys.append(key)
            _encode_into(mapping.values.add(), item, writer, requires_grad, f"{path}[{key!r}]",
                         depth + 1)
    elif isinstance(node, (tuple, list)):
        fields = pytree.named_fields(type(node)) if type(node) not in (tuple, list) else None
        if fields is not None:
            named = value.named_value
            named.type_name = f"{type(node).__module__}.{type(node).__qualname__}"
            named.fields.extend(fields)
            items = named.items
        else:
            seq = value.list_value if type(node) is list else value.tuple_value
            seq.SetInParent()
            items = seq.items
        for i, item in enumerate(node):
            _encode_into(items.add(), item, writer, requires_grad, f"{path}[{i}]", depth + 1)
    else:
        try:
            constant = frameworks.constant_of(node)
        except TypeError as err:
            raise TypeError(f"{path or 'value'}: {err}") from None
        if constant is None:
            raise TypeError(f"{path or 'value'}: cannot send a {type(node).__module__}."
                            f"{type(node).__qualname__}; pytree leaves must be tensors, "
                            "None, bool, int, float, complex, str, slice, Ellipsis or a "
                            "framework's dtype, device, memory format or layout")
        value.constant.kind, value.constant.name = constant


def decode(value: pb.Value, reader: PayloadReader, make_leaf: MakeLeaf, path: str = "",
           abstract: bool = False, statics: Statics | None = None) -> Any:
    """Decode a ``Value``; ``make_leaf(tensor, path)`` turns each wire tensor into an array,
    ``statics`` (default: numpy's) each constant and named tuple into its framework's.

    Abstract tensors decode to :class:`TensorType` where ``abstract`` allows them.
    """
    kind = value.WhichOneof("kind")
    if kind == "tensor":
        msg = value.tensor
        return make_leaf(WireTensor(msg.dtype, tuple(msg.shape), reader.get(msg), msg.requires_grad),
                         path or "value")
    if kind == "abstract":
        if not abstract:
            raise invalid(f"{path or 'value'}: a shape-only tensor is allowed in Signature "
                          "requests only")
        return TensorType.from_pb(value.abstract)   # its size was checked with the message's
    if kind == "none" or kind is None:
        return None
    if kind in ("bool_value", "int_value", "float_value", "str_value"):
        return getattr(value, kind)
    if kind == "complex_value":
        return complex(value.complex_value.real, value.complex_value.imag)
    if kind == "ellipsis":
        return Ellipsis
    if kind == "slice_value":
        s = value.slice_value
        return slice(*(decode(getattr(s, part), reader, make_leaf, f"{path}.{part}", abstract,
                              statics) if s.HasField(part) else None
                       for part in ("start", "stop", "step")))
    found = statics if statics is not None else frameworks.adapter("numpy")
    if kind == "constant":
        try:
            return found.constant(value.constant.kind, value.constant.name)
        except (TypeError, ValueError) as err:
            raise invalid(f"{path or 'value'}: {err}") from None
    if kind == "dict_value":
        m = value.dict_value
        if len(m.keys) != len(m.values):
            raise invalid(f"{path or 'value'}: dict has {len(m.keys)} keys but {len(m.values)} values")
        return {k: decode(v, reader, make_leaf, f"{path}[{k!r}]", abstract, statics)
                for k, v in zip(m.keys, m.values)}
    seq = value.named_value if kind == "named_value" else getattr(value, kind)
    items = [decode(item, reader, make_leaf, f"{path}[{i}]", abstract, statics)
             for i, item in enumerate(seq.items)]
    if kind == "named_value":
        fields = tuple(value.named_value.fields)
        if len(fields) != len(items):
            raise invalid(f"{path or 'value'}: named tuple has {len(fields)} fields but "
                          f"{len(items)} items")
        try:
            return found.named(value.named_value.type_name, fields, items)
        except (TypeError, ValueError) as err:
            raise invalid(f"{path or 'value'}: {err}") from None
    return items if kind == "list_value" else tuple(items)


def encode_arguments(parts: Arguments, writer: PayloadWriter, target: Any,
                     requires_grad: Callable[[Any], bool] | None = None) -> None:
    """Encode a call's parts into ``target``'s ``args``, ``kwargs`` and ``parameters``
    fields (``parameters`` only when given)."""
    encode_into(target.args, parts.args, writer, requires_grad, "args")
    encode_into(target.kwargs, parts.kwargs, writer, requires_grad, "kwargs")
    if parts.parameters is not None:
        encode_into(target.parameters, parts.parameters, writer, requires_grad, "parameters")


def decode_arguments(source: Any, reader: PayloadReader, make_leaf: MakeLeaf,
                     abstract: bool = False, statics: Statics | None = None) -> Arguments:
    """Decode ``source``'s ``args``, ``kwargs`` and ``parameters`` fields (a request's
    inputs, or gradients); INVALID_ARGUMENT unless args is a tuple and kwargs a dict."""
    args = decode(source.args, reader, make_leaf, "args", abstract, statics)
    kwargs = decode(source.kwargs, reader, make_leaf, "kwargs", abstract, statics)
    args = () if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise invalid("args must be a tuple and kwargs a dict")
    parameters = (decode(source.parameters, reader, make_leaf, "parameters", abstract, statics)
                  if source.HasField("parameters") else None)
    return Arguments(args, kwargs, parameters)
