"""The client's transports, one module each, in order of preference.

``TRANSPORTS`` lists them by the ``transport=`` name users ask for. The
same-host ones come first: forcing one asks for it and every same-host one
before it (CPU tensors of a CUDA IPC call use shared memory); ``auto`` asks for
them all, and for UCX (across hosts) only where none came up. A new transport is one module with a
:class:`~gradserve.client.transports.base.ClientTransport` subclass, and its
``RegionKind``.
"""

from __future__ import annotations

from gradserve.client.transports.base import ClientTransport
from gradserve.client.transports.cuda_ipc import CudaIpcTransport
from gradserve.client.transports.shm import ShmTransport
from gradserve.client.transports.ucx import UcxTransport

TRANSPORTS: dict[str, type[ClientTransport]] = {
    ShmTransport.name: ShmTransport,
    CudaIpcTransport.name: CudaIpcTransport,
    UcxTransport.name: UcxTransport,
}

__all__ = ["TRANSPORTS", "ClientTransport", "CudaIpcTransport", "ShmTransport", "UcxTransport"]
