"""torch tensors as wire tensors (used by the torch client and torch endpoints)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from gradserve import dtypes, frameworks
from gradserve.frameworks import DeviceBytes, WireTensor

TO_NAME: dict[torch.dtype, str] = {
    torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16",
    torch.int32: "int32", torch.int64: "int64", torch.float16: "float16",
    torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64",
    torch.complex64: "complex64", torch.complex128: "complex128",
}
FROM_CODE: dict[int, torch.dtype] = {dtypes.code_of(n): d for d, n in TO_NAME.items()}


def wire_dtype(dtype: torch.dtype) -> int:
    """The wire dtype code of a torch dtype."""
    try:
        return dtypes.code_of(TO_NAME[dtype])
    except KeyError:
        raise TypeError(f"torch dtype {dtype} cannot be sent; supported: "
                        f"{', '.join(TO_NAME.values())}") from None


def is_differentiable(t: torch.Tensor) -> bool:
    """Whether ``t``'s dtype can carry gradients."""
    return t.is_floating_point() or t.is_complex()


class TorchAdapter:
    name = "torch"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def wire_dtype(self, x: Any) -> int:
        return wire_dtype(x.dtype)

    def to_wire(self, x: Any) -> WireTensor:
        code = wire_dtype(x.dtype)
        t = x.detach()
        cupy = _cupy() if t.is_cuda and t.numel() else None
        if t.device.type != "cpu" and cupy is None:
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else None
        if cupy is not None:   # handed over as GPU memory (a zero-copy DLPack view)
            return WireTensor(code, tuple(t.shape), DeviceBytes(cupy.from_dlpack(flat), t.device.index))
        return WireTensor(code, tuple(t.shape), memoryview(flat.numpy() if flat is not None else b""))

    def from_wire(self, t: WireTensor) -> torch.Tensor:
        dtype = FROM_CODE[t.dtype]
        if isinstance(t.data, DeviceBytes):
            return torch.from_dlpack(t.data.array).view(dtype).reshape(t.shape)
        if t.data.nbytes == 0:
            return torch.empty(t.shape, dtype=dtype)
        return torch.frombuffer(t.data, dtype=dtype).reshape(t.shape)


@functools.cache
def _cupy() -> Any:
    """CuPy, if importable (it carries GPU payloads); else None."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


ADAPTER = TorchAdapter()
frameworks.register(ADAPTER)
