"""Frameworks: how each one's arrays become wire tensors and back, and where its parts live.

A framework is three modules: an :class:`ArrayAdapter` (``ADAPTER`` in
``gradserve.frameworks.<name>``), an autograd front-end for the client, and an
``Endpoint`` subclass for the server. :data:`FRAMEWORKS` names them; nothing
is imported until an array of that framework is met (found by the top-level
module its type comes from) or the framework is asked for by name, so whether
an array can be sent never depends on what happened to be imported before.
"""

from __future__ import annotations

import collections
import functools
import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import WireTensor


class ArrayAdapter(Protocol):
    """Converts one framework's arrays to and from :class:`WireTensor`."""

    name: str

    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is an array of this framework."""

    def wire_dtype(self, x: Any) -> pb.DType:
        """The wire dtype code of array ``x``."""

    def dtype_code(self, dtype: Any) -> pb.DType:
        """The wire dtype code of one of this framework's dtypes (or a dtype name)."""

    def to_wire(self, x: Any) -> WireTensor:
        """Bytes of ``x`` (a copy only where the framework forces one)."""

    def from_wire(self, t: WireTensor) -> Any:
        """An array of this framework over ``t.data`` (a view wherever it can be one)."""

    def empty(self, shape: tuple[int, ...], code: int, device: Any) -> Any:
        """An ordinary uninitialised array of wire dtype ``code`` on ``device``."""

    def device(self, x: Any) -> Any:
        """The device array ``x`` lives on, as ``empty`` takes it."""

    def copy(self, x: Any) -> Any:
        """An ordinary copy of array ``x``, on its device."""

    def gpu(self, device: Any) -> int | None:
        """Where an array on ``device`` can lie in a session's slot: the local GPU index
        (None: host memory), or ``NO_SLOT`` where no region can hold it."""

    def constant_of(self, x: Any) -> tuple[str, str] | None:
        """``(kind, name)`` when ``x`` is one of this framework's objects that name
        something (a dtype, device, memory format, layout: a wire ``Constant``), else None.
        TypeError for one that has no wire name."""

    def constant(self, kind: str, name: str) -> Any:
        """This framework's object for a received ``Constant`` (ValueError or TypeError
        naming what is wrong when it has none)."""

    def named(self, type_name: str, fields: tuple[str, ...], items: list[Any]) -> Any:
        """A received named tuple as this framework has it."""


class Statics(Protocol):
    """How a receiver rebuilds the static leaves that belong to a framework: constants and
    named tuples (an ``ArrayAdapter``, or a server ``Endpoint``, is one)."""

    def constant(self, kind: str, name: str) -> Any:
        """The object a received ``Constant`` stands for."""

    def named(self, type_name: str, fields: tuple[str, ...], items: list[Any]) -> Any:
        """The tuple a received ``NamedSequence`` stands for."""


#: ``ArrayAdapter.gpu`` for devices whose arrays cannot be views of a session's slot.
NO_SLOT = -1


@dataclass(frozen=True)
class Framework:
    """Where one framework's parts live (module paths, imported on use)."""

    name: str
    roots: tuple[str, ...]       # top-level modules whose arrays the adapter converts
    adapter: str                 # module with ``ADAPTER``
    frontend: str = ""           # client autograd front-end
    endpoint: str = ""           # server ``Endpoint`` subclass (with ``claims``/``build``)


FRAMEWORKS: tuple[Framework, ...] = (
    Framework("numpy", ("numpy",), "gradserve.frameworks.numpy"),
    Framework("torch", ("torch",), "gradserve.frameworks.torch", "gradserve.client.torch",
              "gradserve.server.torch_endpoint"),
    Framework("jax", ("jax", "jaxlib"), "gradserve.frameworks.jax", "gradserve.client.jax",
              "gradserve.server.jax_endpoint"),
)

_BY_ROOT = {root: fw for fw in FRAMEWORKS for root in fw.roots}
_by_type: dict[type, ArrayAdapter | None] = {}


def framework(name: str) -> Framework:
    """The framework called ``name`` ("numpy", "torch", "jax")."""
    for fw in FRAMEWORKS:
        if fw.name == name:
            return fw
    raise ValueError(f"unknown framework {name!r}; known: {', '.join(f.name for f in FRAMEWORKS)}")


@functools.cache
def adapter(name: str) -> ArrayAdapter:
    """The adapter of framework ``name`` (imports it)."""
    module = importlib.import_module(framework(name).adapter)
    found: ArrayAdapter = module.ADAPTER
    return found


def adapter_for(x: Any) -> ArrayAdapter | None:
    """The adapter whose framework owns ``x``, or None for non-arrays."""
    kind = type(x)
    try:
        return _by_type[kind]
    except KeyError:
        pass
    found = None
    for cls in kind.__mro__:
        fw = _BY_ROOT.get(cls.__module__.partition(".")[0])
        if fw is not None:
            candidate = adapter(fw.name)
            if candidate.is_array(x):
                found = candidate
                break
    _by_type[kind] = found
    return found


def constant_of(x: Any) -> tuple[str, str] | None:
    """``(kind, name)`` if ``x`` is a framework's dtype, device, memory format or layout (a
    type such as ``np.float32`` too), found by the module it comes from; else None."""
    module = x.__module__ if isinstance(x, type) else type(x).__module__
    fw = _BY_ROOT.get(str(module).partition(".")[0])
    return adapter(fw.name).constant_of(x) if fw is not None else None


@functools.lru_cache(maxsize=256)
def _tuple_type(type_name: str, fields: tuple[str, ...]) -> type:
    short = type_name.rpartition(".")[2]
    try:
        return collections.namedtuple(short if short.isidentifier() else "Named", fields)
    except ValueError as err:   # field names a namedtuple cannot have
        raise ValueError(f"named tuple {type_name!r}: {err}") from None


def named_tuple(type_name: str, fields: tuple[str, ...], items: list[Any]) -> Any:
    """A namedtuple with ``type_name``'s last part as its name, ``fields`` and ``items``
    (what a receiver that does not know the sender's type makes of it)."""
    return _tuple_type(type_name, fields)(*items)
