"""numpy arrays as wire tensors (the client core's native array type)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from gradserve.frameworks import named_tuple
from gradserve.wire import dtypes
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import WireTensor, host_bytes


@functools.cache
def _code(dtype: np.dtype[Any]) -> pb.DType:
    """The wire code of a numpy dtype (``.name`` is slow to build: found once per dtype)."""
    return dtypes.code_of(dtype.name)


class NumpyAdapter:
    """numpy arrays and scalars; GPU payloads are copied to the host."""

    name = "numpy"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def wire_dtype(self, x: Any) -> pb.DType:
        return _code(np.asarray(x).dtype)

    def dtype_code(self, dtype: Any) -> pb.DType:
        return _code(np.dtype(dtype))

    def to_wire(self, x: Any) -> WireTensor:
        arr = np.asarray(x)
        code = _code(arr.dtype)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # never 0-d here: 0-d arrays are contiguous
        return WireTensor(code, tuple(arr.shape), host_bytes(arr))

    def from_wire(self, t: WireTensor) -> np.ndarray[Any, Any]:
        data = t.data if isinstance(t.data, memoryview) else t.data.host()
        return np.frombuffer(data, dtype=dtypes.numpy_dtype(t.dtype)).reshape(t.shape)

    def empty(self, shape: tuple[int, ...], code: int, device: Any) -> np.ndarray[Any, Any]:
        return np.empty(shape, dtypes.numpy_dtype(code))

    def device(self, x: Any) -> None:
        return None

    def copy(self, x: Any) -> np.ndarray[Any, Any]:
        return np.array(x, copy=True)

    def gpu(self, device: Any) -> int | None:
        if device not in (None, "cpu"):
            raise ValueError(f"numpy arrays live in host memory, not on {device!r}")
        return None

    def constant_of(self, x: Any) -> tuple[str, str] | None:
        if isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
            return "dtype", dtypes.name_of(self.dtype_code(x))
        return None

    def constant(self, kind: str, name: str) -> Any:
        if kind == "dtype":
            return dtypes.numpy_dtype(dtypes.code_of(name))
        raise ValueError(f"a {kind} ({name!r}) has no numpy equivalent")

    def named(self, type_name: str, fields: tuple[str, ...], items: list[Any]) -> Any:
        return named_tuple(type_name, fields, items)


ADAPTER = NumpyAdapter()
