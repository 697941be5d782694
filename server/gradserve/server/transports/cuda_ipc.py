"""The CUDA IPC transport, server side: per-session GPU pools exported as IPC handles.

For each GPU the client named (by UUID) that this server sees too, a request
and a reply pool are allocated with plain ``cudaMalloc`` (``cupy.cuda.Memory``,
not CuPy's or torch's caching pools, whose blocks would expose whole segments)
and exported once as CUDA IPC handles. The server never opens a handle a
client sends. Pools live while the session or any view of them does; their
size is fixed per session.
"""

from __future__ import annotations

from gradserve.client.transports.cuda_ipc import CUDA_ALIGN, local_devices, unavailable
from gradserve.server.transports.base import NewRegion, NextIndex, Refusal, ServerTransport, \
    SessionSettings
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import cupy


class CudaIpcTransport(ServerTransport):
    """A session's CUDA IPC pools."""

    name = "cuda_ipc"
    kind = pb.CUDA_IPC
    min_bytes = 1

    @classmethod
    def create(cls, request: pb.TransportRequest, settings: SessionSettings,
               next_index: NextIndex) -> tuple["CudaIpcTransport", list[NewRegion]]:
        size = request.region_bytes or settings.cuda_pool_bytes
        if size > settings.max_cuda_pool_bytes:
            raise Refusal(f"CUDA IPC pools of {size} bytes asked for; this server allows at "
                          f"most {settings.max_cuda_pool_bytes}")
        why = unavailable()
        if why:
            raise Refusal(f"the server cannot use CUDA IPC: {why}")
        local = local_devices()
        shared = [(uuid, local[uuid]) for uuid in dict.fromkeys(request.devices) if uuid in local]
        if not shared:
            raise Refusal("the server sees none of the client's GPUs (it runs on another node, "
                          "or they are hidden from it)")
        transport = cls(settings)
        cp = cupy()
        made = []
        try:
            for uuid, gpu in shared:
                with cp.cuda.Device(gpu):
                    for direction in (pb.REQUEST, pb.REPLY):
                        memory = cp.cuda.Memory(size)
                        handle = bytes(cp.cuda.runtime.ipcGetMemHandle(memory.ptr))
                        made.append(transport.new_region(
                            next_index(), direction, size, memory, device=uuid, gpu=gpu,
                            handle=handle, align=CUDA_ALIGN))
        except Exception as err:   # CUDARuntimeError: out of memory, IPC not permitted
            transport.close()
            raise Refusal(f"cannot make CUDA IPC pools: {err}") from None
        return transport, made
