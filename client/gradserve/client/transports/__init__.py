"""The client's same-host transports, one module each, in order of preference.

``TRANSPORTS`` lists them by the ``transport=`` name users ask for; forcing
one asks for it and every one before it (CPU tensors of a CUDA IPC call use
shared memory). A new transport is one module with a
:class:`~gradserve.client.transports.base.ClientTransport` subclass, and its
``RegionKind``.
"""

from __future__ import annotations

from gradserve.client.transports.base import ClientTransport
from gradserve.client.transports.cuda_ipc import CudaIpcTransport
from gradserve.client.transports.shm import ShmTransport

TRANSPORTS: dict[str, type[ClientTransport]] = {
    ShmTransport.name: ShmTransport,
    CudaIpcTransport.name: CudaIpcTransport,
}

__all__ = ["TRANSPORTS", "ClientTransport", "CudaIpcTransport", "ShmTransport"]
