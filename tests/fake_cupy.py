"""A stand-in for CuPy whose "GPU memory" is host memory, for the CUDA IPC transports' logic.

It implements only the runtime calls gradserve makes (allocation, IPC handles,
copies, synchronisation, device properties), in one process: an IPC handle is
the allocation's address. With ``same_process=True`` it refuses to open a handle, as CUDA
does in the process that exported it; by default it opens them, as another process would. The real thing runs in the ``gpu``-marked tests.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace
from typing import Any

import numpy as np

HANDLE_BYTES = 64   # sizeof(cudaIpcMemHandle_t)


class Memory:
    """``cupy.cuda.Memory``: an allocation (here, host memory)."""

    def __init__(self, size: int):
        self._buffer = np.zeros(max(size, 1), np.uint8)
        self.ptr = int(self._buffer.ctypes.data)
        self.size = size


class UnownedMemory:
    """``cupy.cuda.UnownedMemory``: memory owned by ``owner``."""

    def __init__(self, ptr: int, size: int, owner: Any, device: int):
        self.ptr, self.size, self.owner, self.device = ptr, size, owner, device


class MemoryPointer:
    def __init__(self, memory: Any, offset: int):
        self.memory = memory
        self.ptr = memory.ptr + offset


class ndarray:   # noqa: N801 (CuPy's name)
    """A 1-D uint8 array at ``memptr``."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, memptr: MemoryPointer):
        (self.nbytes,) = shape
        self.data = memptr

    def host_view(self) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.data.ptr))

    def get(self) -> np.ndarray:
        return self.host_view().copy()

    def copy(self) -> "ndarray":
        out = ndarray((self.nbytes,), np.uint8, MemoryPointer(Memory(self.nbytes), 0))
        out.host_view()[:] = self.host_view()
        return out


class Device:
    def __init__(self, index: int):
        self.index = index

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class Runtime:
    memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice = 1, 2, 3

    def __init__(self, uuids: list[str], same_process: bool):
        self.uuids = uuids
        self.same_process = same_process
        self.synchronized = 0
        self.opened: list[int] = []
        self.closed: list[int] = []

    def getDeviceCount(self) -> int:
        return len(self.uuids)

    def getDeviceProperties(self, index: int) -> dict[str, Any]:
        return {"uuid": bytes.fromhex(self.uuids[index])}

    def ipcGetMemHandle(self, ptr: int) -> bytes:
        return ptr.to_bytes(HANDLE_BYTES, "little")

    def ipcOpenMemHandle(self, handle: bytes) -> int:
        if self.same_process:
            raise RuntimeError("cudaErrorDeviceUninitialized: invalid device context")
        ptr = int.from_bytes(handle, "little")
        self.opened.append(ptr)
        return ptr

    def ipcCloseMemHandle(self, ptr: int) -> None:
        self.closed.append(ptr)

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def memcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def deviceSynchronize(self) -> None:
        self.synchronized += 1


def fake_cupy(uuids: list[str], same_process: bool = False) -> SimpleNamespace:
    """A CuPy stand-in seeing GPUs with these UUIDs (hex)."""
    runtime = Runtime(uuids, same_process)
    cuda = SimpleNamespace(runtime=runtime, Device=Device, Memory=Memory,
                           UnownedMemory=UnownedMemory, MemoryPointer=MemoryPointer,
                           get_current_stream=lambda: SimpleNamespace(ptr=0))
    return SimpleNamespace(cuda=cuda, ndarray=ndarray, uint8=np.uint8)


def device_bytes(cp: Any, data: bytes, device: int = 0) -> Any:
    """``data`` in a fresh fake GPU allocation, as gradserve's ``DeviceBytes``."""
    from gradserve.wire.memory import DeviceBytes
    array = ndarray((len(data),), np.uint8, MemoryPointer(Memory(len(data)), 0))
    array.host_view()[:] = np.frombuffer(data, np.uint8)
    return DeviceBytes(array, device)
