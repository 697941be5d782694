"""Payload bytes in host or GPU memory, and the few operations transports need on them.

Host bytes are a ``memoryview``; GPU bytes are :class:`DeviceBytes`, a 1-D
CuPy ``uint8`` array on one device. CuPy is imported only when GPU bytes are
really handled (it makes the raw CUDA runtime calls and hands memory over by
DLPack).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from gradserve.v1 import gradserve_pb2 as pb


@dataclass
class DeviceBytes:
    """Bytes in GPU memory: ``array`` is a contiguous 1-D CuPy uint8 array on GPU ``device``."""

    array: Any
    device: int

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return int(self.array.nbytes)

    @property
    def ptr(self) -> int:
        """Device address of the first byte."""
        return int(self.array.data.ptr)

    def host(self) -> memoryview:
        """A host copy (for transports that cannot move GPU memory)."""
        return memoryview(self.array.get())


Data = Union[memoryview, DeviceBytes]


@functools.cache
def cupy_or_none() -> Any:
    """CuPy, if it can be imported here; else None."""
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        return None
    return cupy


def cupy() -> Any:
    """CuPy, or ImportError naming the extra that brings it."""
    module = cupy_or_none()
    if module is None:
        raise ImportError("CuPy is not installed (pip install gradserve[cuda])")
    return module


def address(data: memoryview) -> int:
    """Address of a host buffer's first byte (0 when it is empty)."""
    if not data.nbytes:
        return 0
    return int(np.frombuffer(data, np.uint8).ctypes.data)


def host_bytes(array: np.ndarray[Any, Any]) -> memoryview:
    """A byte view of a contiguous numpy array, without a copy."""
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def device_view(memory: Any, offset: int, nbytes: int, device: int) -> DeviceBytes:
    """GPU bytes ``memory[offset:offset + nbytes]`` (a CuPy memory object, kept alive by the view)."""
    cp = cupy()
    return DeviceBytes(cp.ndarray((nbytes,), cp.uint8, cp.cuda.MemoryPointer(memory, offset)),
                       device)


def copy_into(dst: Data, src: Data) -> None:
    """Copy ``src`` into ``dst`` (same size). GPU copies are queued on the current stream:
    synchronise the device before another process reads ``dst``."""
    if src.nbytes != dst.nbytes:
        raise ValueError(f"cannot copy {src.nbytes} bytes into {dst.nbytes}")
    if not src.nbytes:
        return
    if isinstance(dst, memoryview):
        host = src.host() if isinstance(src, DeviceBytes) else src
        dst.cast("B")[:] = host.cast("B")
        return
    cp = cupy()
    runtime = cp.cuda.runtime
    with cp.cuda.Device(dst.device):
        if isinstance(src, DeviceBytes):
            runtime.memcpyAsync(dst.ptr, src.ptr, dst.nbytes, runtime.memcpyDeviceToDevice,
                                cp.cuda.get_current_stream().ptr)
        else:   # synchronous: the host buffer may go away as soon as this returns
            runtime.memcpy(dst.ptr, address(src), dst.nbytes, runtime.memcpyHostToDevice)


def synchronize(device: int | None = None) -> None:
    """Wait until every queued operation on GPU ``device`` (None: every GPU) is done."""
    cp = cupy()
    devices = [device] if device is not None else range(cp.cuda.runtime.getDeviceCount())
    for index in devices:
        with cp.cuda.Device(index):
            cp.cuda.runtime.deviceSynchronize()


@dataclass
class WireTensor:
    """A tensor on its way to or from the wire: dtype code, shape, raw bytes.

    ``data`` is host memory, or GPU memory (:class:`DeviceBytes`) where the
    array lives on a GPU and CuPy is there to hand its bytes over.
    """

    dtype: pb.DType
    shape: tuple[int, ...]
    data: Data   # C-contiguous little-endian bytes, len == nbytes
    requires_grad: bool = False
