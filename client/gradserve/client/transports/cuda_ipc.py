"""The CUDA IPC transport, client side: GPU payloads through pools exported once per session.

For each GPU that client and server both see (matched by UUID, so differing
``CUDA_VISIBLE_DEVICES`` orders do not matter) the server allocates a request
pool and a reply pool with plain ``cudaMalloc`` (not blocks of a framework's
caching allocator, which would expose whole segments and tie their lifetime
to that cache) and exports them as CUDA IPC handles. This side opens each
handle once per session (the server never opens a handle a client sends; CUDA
will not open one in the process that exported it, so a client in the server's
own process maps that pool directly) and
reads back the nonce at the pool's start through it: a pool whose nonce does
not come back is never used. Pools are made only after a one-page probe on
the same GPU was proved the same way. The handle is closed once the session and every
view of the pool are gone.

Ordering: the sender synchronises the pool's device after writing and before
sending references (``FrameWriter.flush``), and this side does so before reporting reply
slots freed, so no kernel still reads a slot the server is about to
overwrite. CuPy makes the raw runtime calls; it is imported only when CUDA
IPC is asked for. Pools have a fixed size: a GPU payload that does not fit
goes through host memory.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import numpy as np

from gradserve.client.transports.base import ClientTransport
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import cupy
from gradserve.wire.slots import NONCE_BYTES

#: GPU pools align slots to 256 bytes, the CUDA allocators' own alignment.
CUDA_ALIGN = 256


def unavailable() -> str:
    """Why this process cannot use CUDA IPC ("" when it can)."""
    try:
        count = cupy().cuda.runtime.getDeviceCount()
    except ImportError as err:
        return str(err)
    except Exception as err:   # CUDARuntimeError: no driver, no device
        return f"CUDA is not usable here ({err})"
    return "" if count else "no CUDA device is visible"


def local_devices() -> dict[str, int]:
    """This process's visible GPUs: UUID -> device index."""
    runtime = cupy().cuda.runtime
    return {_uuid(runtime.getDeviceProperties(i)): i for i in range(runtime.getDeviceCount())}


def _uuid(properties: dict[str, Any]) -> str:
    raw = properties["uuid"]
    return raw.hex() if isinstance(raw, bytes) else str(raw)


class _Exported:
    """A pool this process allocated and exported; it is freed when nothing holds this."""

    def __init__(self, memory: Any):
        self.memory = memory
        self.ptr = int(memory.ptr)


#: The pools this process exported, by IPC handle. CUDA refuses to open a handle in the
#: process that made it, so a client sharing the server's process maps these directly.
_exported: weakref.WeakValueDictionary[bytes, _Exported] = weakref.WeakValueDictionary()


def export(size: int, gpu: int) -> tuple[Any, bytes]:
    """A new pool of ``size`` bytes on local GPU ``gpu`` (plain ``cudaMalloc``) and its IPC
    handle."""
    cp = cupy()
    with cp.cuda.Device(gpu):
        pool = _Exported(cp.cuda.Memory(size))
        handle = bytes(cp.cuda.runtime.ipcGetMemHandle(pool.ptr))
    _exported[handle] = pool
    return cp.cuda.UnownedMemory(pool.ptr, size, pool, gpu), handle


class _Opened:
    """An IPC handle opened in this process, closed when nothing uses it any more."""

    def __init__(self, handle: bytes, device: int):
        cp = cupy()
        with cp.cuda.Device(device):
            self.ptr = int(cp.cuda.runtime.ipcOpenMemHandle(handle))
        weakref.finalize(self, _close_handle, cp, self.ptr, device)


def _map(handle: bytes, device: int) -> _Opened | _Exported:
    """The pool behind ``handle`` (its ``ptr``), mapped into this process."""
    try:
        return _Opened(handle, device)
    except Exception:
        own = _exported.get(handle)
        if own is None:
            raise
        return own


def _close_handle(cp: Any, ptr: int, device: int) -> None:
    with cp.cuda.Device(device):
        cp.cuda.runtime.ipcCloseMemHandle(ptr)


def read_nonce(ptr: int, device: int) -> bytes:
    """The ``NONCE_BYTES`` at device address ``ptr``."""
    cp = cupy()
    nonce = np.empty(NONCE_BYTES, np.uint8)
    with cp.cuda.Device(device):
        cp.cuda.runtime.memcpy(nonce.ctypes.data, ptr, NONCE_BYTES,
                               cp.cuda.runtime.memcpyDeviceToHost)
    return nonce.tobytes()


class CudaIpcTransport(ClientTransport):
    """CUDA IPC pools on the GPUs both sides see; ``region_bytes`` sizes them (0: the
    server's default)."""

    name = "cuda_ipc"
    kind = pb.CUDA_IPC
    align = CUDA_ALIGN

    @staticmethod
    def unavailable() -> str:
        return unavailable()

    @functools.cached_property
    def _local(self) -> dict[str, int]:
        return local_devices()

    def ask(self) -> pb.TransportRequest:
        return pb.TransportRequest(kind=self.kind, region_bytes=self.region_bytes,
                                   devices=list(self._local))

    def open(self, msg: pb.Region) -> tuple[Any, int | None, bytes]:
        gpu = self._local.get(msg.device)
        if gpu is None:
            raise ValueError(f"GPU {msg.device} is not visible here")
        opened = _map(msg.handle, gpu)
        nonce = read_nonce(opened.ptr, gpu)
        if msg.direction == pb.PROBE:
            return None, gpu, nonce        # the handle closes with `opened`
        return cupy().cuda.UnownedMemory(opened.ptr, msg.nbytes, opened, gpu), gpu, nonce

    def cannot_open(self, msg: pb.Region, err: Exception) -> str:
        return f"cannot open the pool on GPU {msg.device}: {err}"
