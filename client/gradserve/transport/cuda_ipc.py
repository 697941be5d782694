"""The CUDA IPC transport: GPU tensor payloads through pools exported once per session.

For each GPU that client and server both see (matched by UUID, so differing
``CUDA_VISIBLE_DEVICES`` orders do not matter) the server allocates two pools
with plain ``cudaMalloc`` and exports them as CUDA IPC handles when the
session opens: the request pool, in which the client allocates and writes
inputs and cotangents, and the reply pool, in which the server writes outputs
and gradients. Dedicated pools, not blocks of a framework's caching
allocator, which would expose whole segments to the peer and tie their
lifetime to that cache. The client opens each handle once per session (the
server never opens a handle a client sends). A ``Tensor`` then carries
``CudaRef(pool, offset, nbytes)``, bounds-checked before any view is made.

Same-device proof: each reply pool starts with a random nonce that the
client reads through its handle and sends back; a pool whose nonce does not
come back is never used. Ordering: the sender synchronises the pool's device
after writing and before sending references (``flush``), and the client does
so before reporting reply slots freed, so no kernel still reads a slot that
the server is about to overwrite.

Lifetimes: the server's pools are ``cupy.cuda.Memory`` objects that every
view keeps alive; the client closes a handle once the session and every view
of it are gone. CuPy makes the raw runtime calls and hands views over by
DLPack; it is imported only when CUDA IPC is asked for.
"""

from __future__ import annotations

import collections
import hmac
import secrets
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from gradserve.frameworks import DeviceBytes
from gradserve.transport.arena import Arena, check_slot
from gradserve.v1 import gradserve_pb2 as pb

NONCE_BYTES = 32
#: GPU pools align slots to 256 bytes, the CUDA allocators' own alignment.
CUDA_ALIGN = 256


def _cupy() -> Any:
    import cupy
    return cupy


def unavailable() -> str:
    """Why this process cannot use CUDA IPC ("" when it can)."""
    try:
        count = _cupy().cuda.runtime.getDeviceCount()
    except ImportError:
        return "CuPy is not installed (pip install gradserve[cuda])"
    except Exception as err:   # CUDARuntimeError: no driver, no device
        return f"CUDA is not usable here ({err})"
    return "" if count else "no CUDA device is visible"


def local_devices() -> dict[str, int]:
    """This process's visible GPUs: UUID -> device index."""
    runtime = _cupy().cuda.runtime
    return {_uuid(runtime.getDeviceProperties(i)): i for i in range(runtime.getDeviceCount())}


def _uuid(properties: dict) -> str:
    raw = properties["uuid"]
    return raw.hex() if isinstance(raw, bytes) else str(raw)


@dataclass
class _Pool:
    """One GPU's pair of pools: ours (we allocate and write) and the peer's (we read)."""

    device: int
    outgoing: Any        # cupy.cuda.Memory or UnownedMemory
    incoming: Any
    arena: Arena
    ready: bool = True

    def array(self, memory: Any, offset: int, nbytes: int) -> Any:
        """A uint8 CuPy array over ``memory[offset:offset + nbytes]`` that keeps ``memory`` alive."""
        cupy = _cupy()
        return cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(memory, offset))


class _CudaPeer:
    """One side of a session's CUDA IPC pools; a ``transport.Peer`` of kind "cuda"."""

    kind = "cuda"
    min_bytes = 1

    def __init__(self, pools: list[_Pool]):
        self.pools = pools

    def _pool_on(self, device: int) -> int | None:
        for index, pool in enumerate(self.pools):
            if pool.ready and pool.device == device:
                return index
        return None

    def accepts(self, data: Any) -> bool:
        return isinstance(data, DeviceBytes) and self._pool_on(data.device) is not None

    def place(self, data: DeviceBytes) -> tuple[pb.CudaRef, bool] | None:
        """A slot holding ``data`` (one device-to-device copy, none if it already lives
        in the outgoing pool) and whether it was allocated for it; None when full."""
        index = self._pool_on(data.device)
        pool = self.pools[index]
        n, base = data.nbytes, pool.outgoing.ptr
        if base <= data.ptr and data.ptr + n <= base + pool.arena.size:
            return pb.CudaRef(pool=index, offset=data.ptr - base, nbytes=n), False
        offset = pool.arena.alloc(n)
        if offset is None:
            return None
        cupy = _cupy()
        with cupy.cuda.Device(pool.device):
            cupy.cuda.runtime.memcpyAsync(base + offset, data.ptr, n,
                                          cupy.cuda.runtime.memcpyDeviceToDevice,
                                          cupy.cuda.get_current_stream().ptr)
        return pb.CudaRef(pool=index, offset=offset, nbytes=n), True

    def flush(self) -> None:
        cupy = _cupy()
        for device in {pool.device for pool in self.pools if pool.ready}:
            with cupy.cuda.Device(device):
                cupy.cuda.runtime.deviceSynchronize()

    def check(self, ref: pb.CudaRef, nbytes: int, path: str) -> None:
        check_slot(path, "CUDA IPC", "pool", ref.pool,
                   [p.arena.size if p.ready else None for p in self.pools],
                   ref.offset, ref.nbytes, nbytes)

    def free(self, refs: Iterable[pb.CudaRef]) -> None:
        for ref in refs:
            if ref.pool < len(self.pools):
                self.pools[ref.pool].arena.free(ref.offset)


class ServerCudaPeer(_CudaPeer):
    """The server's side: allocates both pools per GPU, reads requests in place."""

    def __init__(self, pools: list[_Pool], nonces: list[bytes]):
        super().__init__(pools)
        self._nonces = nonces

    @classmethod
    def create(cls, devices: list[tuple[str, int]], size: int) -> tuple["ServerCudaPeer", list[pb.CudaPool]]:
        """Pools of ``size`` bytes on each ``(uuid, index)`` device, not ready until confirmed."""
        cupy = _cupy()
        runtime = cupy.cuda.runtime
        pools, nonces, exported = [], [], []
        for uuid, device in devices:
            with cupy.cuda.Device(device):
                request, reply = cupy.cuda.Memory(size), cupy.cuda.Memory(size)
                nonce = secrets.token_bytes(NONCE_BYTES)
                host = np.frombuffer(nonce, np.uint8)
                runtime.memcpy(reply.ptr, host.ctypes.data, NONCE_BYTES, runtime.memcpyHostToDevice)
                exported.append(pb.CudaPool(device=uuid, pool_bytes=size,
                                            request_handle=bytes(runtime.ipcGetMemHandle(request.ptr)),
                                            reply_handle=bytes(runtime.ipcGetMemHandle(reply.ptr))))
            arena = Arena(size, CUDA_ALIGN)
            arena.alloc(NONCE_BYTES)   # the nonce's slot, until confirmed
            pools.append(_Pool(device, reply, request, arena, ready=False))
            nonces.append(nonce)
        return cls(pools, nonces), exported

    def confirm(self, echoed: list[bytes]) -> list[bool]:
        """Enable the pools whose nonce the client read back; returns which."""
        ready = []
        for i, pool in enumerate(self.pools):
            ok = i < len(echoed) and hmac.compare_digest(echoed[i], self._nonces[i])
            if ok:
                pool.arena.free(0)
            pool.ready = ok
            ready.append(ok)
        return ready

    def view(self, ref: pb.CudaRef) -> DeviceBytes:
        pool = self.pools[ref.pool]
        return DeviceBytes(pool.array(pool.incoming, ref.offset, ref.nbytes), pool.device)


class _Opened:
    """An IPC handle opened in this process, closed when nothing uses it any more."""

    def __init__(self, handle: bytes, device: int):
        cupy = _cupy()
        with cupy.cuda.Device(device):
            self.ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)
        weakref.finalize(self, _close_handle, self.ptr, device)


def _close_handle(ptr: int, device: int) -> None:
    cupy = _cupy()
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.ipcCloseMemHandle(ptr)


class ClientCudaPeer(_CudaPeer):
    """The client's side: writes requests, views replies until their owners are collected."""

    def __init__(self, pools: list[_Pool]):
        super().__init__(pools)
        self.freed: collections.deque[tuple[int, int]] = collections.deque()

    @classmethod
    def open(cls, exported: Iterable[pb.CudaPool]) -> tuple["ClientCudaPeer", list[bytes], list[str]]:
        """Open the server's pools on the matching local GPUs; returns the peer, the
        nonce read from each pool (b"" where it failed) and why each failure happened."""
        cupy = _cupy()
        runtime = cupy.cuda.runtime
        local = local_devices()
        pools, nonces, failures = [], [], []
        for pool in exported:
            device = local.get(pool.device, -1)
            try:
                if device < 0:
                    raise ValueError(f"GPU {pool.device} is not visible here")
                size = pool.pool_bytes
                request, reply = _Opened(pool.request_handle, device), _Opened(pool.reply_handle, device)
                nonce = np.empty(NONCE_BYTES, np.uint8)
                with cupy.cuda.Device(device):
                    runtime.memcpy(nonce.ctypes.data, reply.ptr, NONCE_BYTES, runtime.memcpyDeviceToHost)
                pools.append(_Pool(device, cupy.cuda.UnownedMemory(request.ptr, size, request, device),
                                   cupy.cuda.UnownedMemory(reply.ptr, size, reply, device),
                                   Arena(size, CUDA_ALIGN)))
                nonces.append(nonce.tobytes())
            except Exception as err:   # CUDARuntimeError: another node, no peer access
                pools.append(_Pool(max(device, 0), None, None, Arena(0), ready=False))
                nonces.append(b"")
                failures.append(f"cannot open the pool on GPU {pool.device}: {err}")
        return cls(pools), nonces, failures

    def confirmed(self, ready: Iterable[bool]) -> None:
        """Keep using only the pools the server confirmed."""
        for pool, ok in zip(self.pools, ready):
            pool.ready = pool.ready and ok

    @property
    def usable(self) -> bool:
        return any(pool.ready for pool in self.pools)

    def allocate(self, nbytes: int, device: int) -> DeviceBytes | None:
        """Bytes in the request pool on ``device``, their slot freed when collected."""
        index = self._pool_on(device)
        if index is None:
            return None
        pool = self.pools[index]
        offset = pool.arena.alloc(nbytes)
        if offset is None:
            return None
        owner = pool.array(pool.outgoing, offset, nbytes)
        weakref.finalize(owner, pool.arena.free, offset)
        return DeviceBytes(owner, pool.device)

    def view(self, ref: pb.CudaRef) -> DeviceBytes:
        pool = self.pools[ref.pool]
        owner = pool.array(pool.incoming, ref.offset, ref.nbytes)
        weakref.finalize(owner, self.freed.append, (ref.pool, ref.offset))
        return DeviceBytes(owner, pool.device)

    def take_freed(self) -> list[pb.CudaRef]:
        """Reply slots collected since the last call; the device is synchronised first, so
        no kernel still reads them when the server reuses them."""
        taken = []
        while self.freed:
            pool, offset = self.freed.popleft()
            taken.append(pb.CudaRef(pool=pool, offset=offset))
        if taken:
            self.flush()
        return taken
