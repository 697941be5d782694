"""The CUDA IPC transport, server side: per-session GPU pools exported as IPC handles.

For each GPU the client named (by UUID) that this server sees too,
``OpenSession`` makes a one-page probe allocation; once the client proved
(through the probe's IPC handle) that it reaches that GPU, a request and a
reply pool are allocated there with plain ``cudaMalloc`` (``cupy.cuda.Memory``,
not CuPy's or torch's caching pools, whose blocks would expose whole
segments) and exported once as CUDA IPC handles. The server never opens a
handle a client sends. Pools live while the session or any view of them does;
their size is fixed per session, and all sessions' pools on one GPU together
take their bytes from the server's budget.
"""

from __future__ import annotations

import functools

from gradserve.client.transports.cuda_ipc import CUDA_ALIGN, export, local_devices, unavailable
from gradserve.server.transports.base import PROBE_BYTES, Budget, NewRegion, NextIndex, Refusal, \
    ServerTransport, SessionSettings
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.memory import cupy
from gradserve.wire.slots import Region


class CudaIpcTransport(ServerTransport):
    """A session's CUDA IPC pools."""

    name = "cuda_ipc"
    kind = pb.CUDA_IPC
    min_bytes = 1

    @classmethod
    def create(cls, request: pb.TransportRequest, settings: SessionSettings, budget: Budget,
               next_index: NextIndex) -> tuple["CudaIpcTransport", list[NewRegion]]:
        size = request.region_bytes or settings.cuda_pool_bytes
        if not PROBE_BYTES <= size <= settings.max_cuda_pool_bytes:
            raise Refusal(f"CUDA IPC pools of {size} bytes asked for; this server allows "
                          f"{PROBE_BYTES} to {settings.max_cuda_pool_bytes}")
        why = unavailable()
        if why:
            raise Refusal(f"the server cannot use CUDA IPC: {why}")
        local = local_devices()
        shared = [(uuid, local[uuid]) for uuid in dict.fromkeys(request.devices) if uuid in local]
        if not shared:
            raise Refusal("the server sees none of the client's GPUs (it runs on another node, "
                          "or they are hidden from it)")
        transport = cls(size, settings, budget)
        try:
            return transport, transport.all_or_none(
                functools.partial(transport._pool, next_index, pb.PROBE, PROBE_BYTES, uuid, gpu)
                for uuid, gpu in shared)
        except Exception as err:   # RESOURCE_EXHAUSTED from the budget; CUDARuntimeError
            raise Refusal(f"cannot make CUDA IPC probes: {err}") from None

    def regions_for(self, probe: Region, next_index: NextIndex) -> list[NewRegion]:
        assert probe.gpu is not None
        try:
            return self.all_or_none(
                functools.partial(self._pool, next_index, direction, self.region_bytes,
                                  probe.device, probe.gpu)
                for direction in (pb.REQUEST, pb.REPLY))
        except Exception as err:
            raise Refusal(f"cannot make CUDA IPC pools on GPU {probe.device}: {err}") from None

    def _pool(self, next_index: NextIndex, direction: pb.Direction, size: int, uuid: str,
              gpu: int) -> NewRegion:
        """One pool of ``size`` bytes on local GPU ``gpu``, exported."""
        with cupy().cuda.Device(gpu):
            return self.new_region(next_index, direction, size, lambda: export(size, gpu),
                                   device=uuid, gpu=gpu, align=CUDA_ALIGN)
