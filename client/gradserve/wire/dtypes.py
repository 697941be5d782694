"""The wire dtypes: names, item sizes and numpy equivalents."""

from __future__ import annotations

import functools
from typing import Any, cast

import numpy as np

from gradserve.errors import invalid
from gradserve.v1 import gradserve_pb2 as pb

#: Wire dtype -> canonical name, shared by every framework adapter.
NAMES: dict[int, str] = {
    pb.BOOL: "bool", pb.UINT8: "uint8", pb.INT8: "int8", pb.INT16: "int16",
    pb.INT32: "int32", pb.INT64: "int64", pb.FLOAT16: "float16",
    pb.BFLOAT16: "bfloat16", pb.FLOAT32: "float32", pb.FLOAT64: "float64",
    pb.COMPLEX64: "complex64", pb.COMPLEX128: "complex128",
}
BY_NAME: dict[str, pb.DType] = {name: cast(pb.DType, code) for code, name in NAMES.items()}
ITEMSIZE: dict[int, int] = {
    pb.BOOL: 1, pb.UINT8: 1, pb.INT8: 1, pb.INT16: 2, pb.INT32: 4, pb.INT64: 8,
    pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT32: 4, pb.FLOAT64: 8,
    pb.COMPLEX64: 8, pb.COMPLEX128: 16,
}
#: Dtypes that carry gradients.
DIFFERENTIABLE = frozenset({pb.FLOAT16, pb.BFLOAT16, pb.FLOAT32, pb.FLOAT64,
                            pb.COMPLEX64, pb.COMPLEX128})


def code_of(name: str) -> pb.DType:
    """Wire dtype for a canonical dtype name such as ``"float32"``."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise TypeError(f"unsupported dtype {name!r}; supported: {', '.join(BY_NAME)}") from None


def name_of(code: int) -> str:
    """Canonical name of a wire dtype; INVALID_ARGUMENT for unknown codes."""
    try:
        return NAMES[code]
    except KeyError:
        raise invalid(f"unknown wire dtype {code}") from None


@functools.cache
def numpy_dtype(code: int) -> np.dtype[Any]:
    """The numpy dtype for a wire dtype (bfloat16 needs the ml_dtypes package)."""
    name = name_of(code)
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError("bfloat16 arrays need the ml_dtypes package for numpy") from None
        found: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return found
    return np.dtype(name).newbyteorder("<")


#: Most dimensions a tensor may have (numpy's and JAX's limit).
MAX_RANK = 64
#: Most elements any dimension product may reach, zero dimensions aside (int64 strides).
MAX_ELEMENTS = 2**62


def nbytes(code: int, shape: tuple[int, ...]) -> int:
    """Byte size of a dense tensor; rejects unknown dtypes, bad ranks and dims, overflow."""
    size = ITEMSIZE.get(code)
    if size is None:
        raise invalid(f"unknown wire dtype {code}")
    if len(shape) > MAX_RANK:
        raise invalid(f"{len(shape)} dimensions, more than the {MAX_RANK} supported")
    if any(dim < 0 for dim in shape):
        raise invalid(f"negative dimension in shape {list(shape)}")
    nonzero = 1
    for dim in shape:
        nonzero *= max(dim, 1)
        if nonzero > MAX_ELEMENTS:
            raise invalid(f"shape {list(shape)} overflows 64-bit indexing")
    for dim in shape:
        size *= dim
    return size
