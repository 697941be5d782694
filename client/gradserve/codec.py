"""The wire codec: Python pytrees <-> ``gradserve.v1.Value`` messages.

Tensor leaves of any registered framework become ``Tensor`` messages whose
payload a transport fills in (``PayloadWriter``) and reads back
(``PayloadReader``); static leaves travel as scalars. Nothing is pickled.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from google.protobuf.message import Message

from gradserve import dtypes, frameworks
from gradserve.errors import invalid
from gradserve.frameworks import WireTensor
from gradserve.specs import TensorSpec
from gradserve.transport import PayloadReader, PayloadWriter
from gradserve.v1 import gradserve_pb2 as pb

_INT64 = (-(2**63), 2**63 - 1)


def encode(tree: Any, writer: PayloadWriter,
           requires_grad: Callable[[Any], bool] | None = None, path: str = "") -> pb.Value:
    """Encode a pytree; ``requires_grad(leaf)`` flags tensors to differentiate."""
    value = pb.Value()
    _encode_into(value, tree, writer, requires_grad, path)
    return value


def _encode_into(value: pb.Value, node: Any, writer: PayloadWriter,
                 requires_grad: Callable[[Any], bool] | None, path: str) -> None:
    adapter = frameworks.adapter_for(node)
    if adapter is not None:
        wire = adapter.to_wire(node)
        msg = value.tensor
        msg.dtype = wire.dtype
        msg.shape.extend(wire.shape)
        msg.requires_grad = bool(requires_grad and requires_grad(node))
        writer.put(msg, wire)
    elif isinstance(node, TensorSpec):
        if node.dtype is None or any(d is None for d in node.shape):
            raise TypeError(f"{path or 'value'}: an abstract tensor needs a dtype and every "
                            f"dimension, got {node}")
        value.abstract.CopyFrom(node.to_pb())
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
    elif isinstance(node, str):
        value.str_value = node
    elif isinstance(node, dict):
        mapping = value.dict_value
        mapping.SetInParent()
        for key, item in node.items():
            if not isinstance(key, str):
                raise TypeError(f"{path or 'value'}: dict keys must be str, got {type(key).__name__}")
            mapping.keys.append(key)
            _encode_into(mapping.values.add(), item, writer, requires_grad, f"{path}[{key!r}]")
    elif isinstance(node, (tuple, list)):
        seq = value.list_value if type(node) is list else value.tuple_value
        seq.SetInParent()
        for i, item in enumerate(node):
            _encode_into(seq.items.add(), item, writer, requires_grad, f"{path}[{i}]")
    else:
        raise TypeError(f"{path or 'value'}: cannot send a {type(node).__module__}."
                        f"{type(node).__qualname__}; pytree leaves must be tensors, "
                        "None, bool, int, float or str")


def decode(value: pb.Value, reader: PayloadReader,
           make_leaf: Callable[[WireTensor, str], Any], path: str = "",
           abstract: bool = False) -> Any:
    """Decode a ``Value``; ``make_leaf(tensor, path)`` turns each wire tensor into an array.

    Abstract tensors decode to :class:`TensorSpec` where ``abstract`` allows them.
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
        spec = value.abstract
        tensor_nbytes(path, spec)
        return TensorSpec(tuple(spec.shape), dtypes.NAMES[spec.dtype])
    if kind == "none" or kind is None:
        return None
    if kind in ("bool_value", "int_value", "float_value", "str_value"):
        return getattr(value, kind)
    if kind == "dict_value":
        m = value.dict_value
        if len(m.keys) != len(m.values):
            raise invalid(f"{path or 'value'}: dict has {len(m.keys)} keys but {len(m.values)} values")
        return {k: decode(v, reader, make_leaf, f"{path}[{k!r}]", abstract)
                for k, v in zip(m.keys, m.values)}
    items = [decode(item, reader, make_leaf, f"{path}[{i}]", abstract)
             for i, item in enumerate(getattr(value, kind).items)]
    return items if kind == "list_value" else tuple(items)


def tensors(msg: Message, path: str = "", kind: str = "tensor") -> Iterator[tuple[str, Any]]:
    """Every tensor leaf (``kind`` "tensor", or "abstract") inside a message, with a
    readable path such as ``args[0]``."""
    if isinstance(msg, pb.Value):
        which = msg.WhichOneof("kind")
        if which == kind:
            yield path, getattr(msg, kind)
        elif which in ("list_value", "tuple_value"):
            for i, item in enumerate(getattr(msg, which).items):
                yield from tensors(item, f"{path}[{i}]", kind)
        elif which == "dict_value":
            for key, item in zip(msg.dict_value.keys, msg.dict_value.values):
                yield from tensors(item, f"{path}[{key!r}]", kind)
    else:
        for field, val in msg.ListFields():
            if field.message_type is None:
                continue
            sub = f"{path}.{field.name}" if path else field.name
            for i, item in enumerate(val) if field.is_repeated else [(None, val)]:
                yield from tensors(item, sub if i is None else f"{sub}[{i}]", kind)


def abstract_tensors(msg: Message) -> Iterator[tuple[str, pb.TensorSpec]]:
    """Every shape-only tensor inside a message (they count against size limits too)."""
    return tensors(msg, kind="abstract")


def tensor_nbytes(path: str, msg: pb.Tensor | pb.TensorSpec) -> int:
    """Validated byte size of a tensor message (dtype known, dims non-negative)."""
    try:
        return dtypes.nbytes(msg.dtype, tuple(msg.shape))
    except Exception as err:
        raise invalid(f"{path or 'tensor'}: {err}") from None
