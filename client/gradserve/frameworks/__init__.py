"""Array adapters: how each framework's arrays become wire tensors and back.

Each framework is one module registering an :class:`ArrayAdapter`; the codec
asks the registry which adapter owns a leaf. numpy is always registered; torch
and jax register when their module is imported (which happens only when a
caller uses them, so the client core never imports either).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class DeviceBytes:
    """Bytes in GPU memory: ``array`` is a contiguous 1-D CuPy uint8 array on GPU ``device``."""

    array: Any
    device: int

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    @property
    def ptr(self) -> int:
        return int(self.array.data.ptr)

    def host(self) -> memoryview:
        """A host copy (for transports that cannot move GPU memory)."""
        return memoryview(self.array.get())


@dataclass
class WireTensor:
    """A tensor on its way to or from the wire: dtype code, shape, raw bytes.

    ``data`` is host memory, or GPU memory (:class:`DeviceBytes`) where the
    array lives on a GPU and CuPy is there to hand its bytes over.
    """

    dtype: int
    shape: tuple[int, ...]
    data: memoryview | DeviceBytes   # C-contiguous little-endian bytes, len == nbytes
    requires_grad: bool = False


class ArrayAdapter(Protocol):
    """Converts one framework's arrays to and from :class:`WireTensor`."""

    name: str

    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is an array of this framework."""

    def wire_dtype(self, x: Any) -> int:
        """The wire dtype code of ``x``."""

    def to_wire(self, x: Any) -> WireTensor:
        """Host bytes of ``x`` (a copy only where the framework forces one)."""

    def from_wire(self, t: WireTensor) -> Any:
        """An array of this framework viewing or copying ``t.data``."""


_ADAPTERS: list[ArrayAdapter] = []


def register(adapter: ArrayAdapter) -> None:
    """Make ``adapter``'s arrays encodable as tensor leaves."""
    if all(a.name != adapter.name for a in _ADAPTERS):
        _ADAPTERS.append(adapter)


def adapter_for(x: Any) -> ArrayAdapter | None:
    """The adapter whose framework owns ``x``, or None for non-arrays."""
    for adapter in _ADAPTERS:
        if adapter.is_array(x):
            return adapter
    return None


from gradserve.frameworks import numpy as _numpy  # noqa: E402  (registers itself)

register(_numpy.ADAPTER)
