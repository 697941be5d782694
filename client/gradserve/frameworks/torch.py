"""torch tensors as wire tensors (used by the torch client and torch endpoints)."""

from __future__ import annotations

from typing import Any

import torch

from gradserve import dtypes, frameworks
from gradserve.frameworks import WireTensor

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
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        return WireTensor(code, tuple(t.shape), memoryview(data))

    def from_wire(self, t: WireTensor) -> torch.Tensor:
        dtype = FROM_CODE[t.dtype]
        if t.data.nbytes == 0:
            return torch.empty(t.shape, dtype=dtype)
        return torch.frombuffer(t.data, dtype=dtype).reshape(t.shape)


ADAPTER = TorchAdapter()
frameworks.register(ADAPTER)
