"""torch tensors as wire tensors (used by the torch client and torch endpoints).

A CUDA tensor's bytes are handed over as GPU memory (a zero-copy DLPack view,
with CuPy installed); without CuPy they are copied to the host.
"""

from __future__ import annotations

from typing import Any

import torch

from gradserve.frameworks import named_tuple
from gradserve.wire import dtypes
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import DeviceBytes, WireTensor, cupy_or_none

TO_NAME: dict[torch.dtype, str] = {
    torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16",
    torch.int32: "int32", torch.int64: "int64", torch.float16: "float16",
    torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64",
    torch.complex64: "complex64", torch.complex128: "complex128",
}
FROM_CODE: dict[int, torch.dtype] = {dtypes.code_of(n): d for d, n in TO_NAME.items()}


def wire_dtype(dtype: torch.dtype) -> pb.DType:
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
    """torch tensors, on the CPU or a CUDA device."""

    name = "torch"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def wire_dtype(self, x: Any) -> pb.DType:
        return wire_dtype(x.dtype)

    def dtype_code(self, dtype: Any) -> pb.DType:
        return wire_dtype(dtype) if isinstance(dtype, torch.dtype) else dtypes.code_of(str(dtype))

    def refusal(self, x: torch.Tensor) -> str:
        """Why tensor ``x`` cannot travel ("" when it can)."""
        if x.layout != torch.strided:
            return (f"a {str(x.layout).removeprefix('torch.')} tensor cannot be sent: only "
                    "dense (strided) tensors travel; send x.to_dense()")
        if x.is_quantized:
            return "a quantized tensor cannot be sent; send x.dequantize()"
        if x.is_nested or x.device.type == "meta":
            return (f"a {'nested' if x.is_nested else 'meta'} tensor cannot be sent: only "
                    "tensors holding their values travel")
        if x.dtype not in TO_NAME:
            return f"torch dtype {x.dtype} cannot be sent; supported: {', '.join(TO_NAME.values())}"
        return ""

    def to_wire(self, x: Any) -> WireTensor:
        problem = self.refusal(x)
        if problem:
            raise TypeError(problem)
        code = wire_dtype(x.dtype)
        t = x.detach()
        if t._is_zerotensor():   # autograd's symbolic zeros have no storage to send
            t = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
        cupy = cupy_or_none() if t.is_cuda and t.numel() else None
        if t.device.type != "cpu" and cupy is None:
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        if not t.numel():
            return WireTensor(code, tuple(t.shape), memoryview(b""))
        flat = t.reshape(-1)
        if flat.stride(0) != 1:   # one element behind a 0 stride (expand, block_diag grads)
            flat = flat.new_empty(flat.shape).copy_(flat)
        raw = flat.view(torch.uint8)
        if cupy is not None:
            return WireTensor(code, tuple(t.shape), DeviceBytes(cupy.from_dlpack(raw), t.device.index))
        return WireTensor(code, tuple(t.shape), memoryview(raw.numpy()))

    def from_wire(self, t: WireTensor) -> torch.Tensor:
        dtype = FROM_CODE[t.dtype]
        if isinstance(t.data, DeviceBytes):
            return torch.utils.dlpack.from_dlpack(t.data.array).view(dtype).reshape(t.shape)
        if t.data.nbytes == 0:
            return torch.empty(t.shape, dtype=dtype)
        return torch.frombuffer(t.data, dtype=dtype).reshape(t.shape)

    def empty(self, shape: tuple[int, ...], code: int, device: Any) -> torch.Tensor:
        return torch.empty(shape, dtype=FROM_CODE[code], device=device)

    def device(self, x: Any) -> Any:
        return x.device

    def copy(self, x: Any) -> Any:
        return x.detach().clone()

    def gpu(self, device: Any) -> int | None:
        place = torch.device(device if device is not None else "cpu")
        if place.type != "cuda":
            return None
        return place.index if place.index is not None else torch.cuda.current_device()

    def constant_of(self, x: Any) -> tuple[str, str] | None:
        if isinstance(x, torch.dtype):
            return "dtype", dtypes.name_of(wire_dtype(x))
        if isinstance(x, torch.device):
            return "device", str(x)
        for kind, cls in CONSTANT_TYPES.items():
            if isinstance(x, cls):
                return kind, str(x).removeprefix("torch.")
        return None

    def constant(self, kind: str, name: str) -> Any:
        if kind == "dtype":
            return FROM_CODE[dtypes.code_of(name)]
        if kind == "device":
            try:
                return torch.device(name)
            except RuntimeError:
                raise ValueError(f"{name!r} is not a torch device") from None
        cls = CONSTANT_TYPES.get(kind)
        found = getattr(torch, name, None) if cls is not None and name.isidentifier() else None
        if cls is None or not isinstance(found, cls):
            raise ValueError(f"torch has no {kind} called {name!r}")
        return found

    def named(self, type_name: str, fields: tuple[str, ...], items: list[Any]) -> Any:
        module, _, short = type_name.rpartition(".")
        cls = getattr(torch.return_types, short, None) if module == "torch.return_types" else None
        if cls is not None and getattr(cls, "__match_args__", None) == fields:
            return cls(items)
        return named_tuple(type_name, fields, items)


#: torch's other objects that name something, by their wire ``Constant`` kind.
CONSTANT_TYPES: dict[str, type] = {"memory_format": torch.memory_format,
                                   "layout": torch.layout}


ADAPTER = TorchAdapter()
