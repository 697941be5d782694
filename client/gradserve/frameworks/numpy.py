"""numpy arrays as wire tensors (the client core's native array type)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradserve import dtypes
from gradserve.frameworks import WireTensor


class NumpyAdapter:
    name = "numpy"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def wire_dtype(self, x: Any) -> int:
        return dtypes.code_of(np.asarray(x).dtype.name)

    def to_wire(self, x: Any) -> WireTensor:
        arr = np.asarray(x)
        code = dtypes.code_of(arr.dtype.name)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # never 0-d here: 0-d arrays are contiguous
        return WireTensor(code, tuple(arr.shape), memoryview(arr.reshape(-1).view(np.uint8)))

    def from_wire(self, t: WireTensor) -> np.ndarray:
        data = t.data if isinstance(t.data, memoryview) else t.data.host()
        return np.frombuffer(data, dtype=dtypes.numpy_dtype(t.dtype)).reshape(t.shape)


ADAPTER = NumpyAdapter()
