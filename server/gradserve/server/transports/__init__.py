"""The server's transports, one module each, by the region kind they serve.

A new transport is one module with a
:class:`~gradserve.server.transports.base.ServerTransport` subclass, and its
``RegionKind`` in the protocol.
"""

from __future__ import annotations

from gradserve.server.transports.base import Refusal, ServerTransport, SessionSettings
from gradserve.server.transports.cuda_ipc import CudaIpcTransport
from gradserve.server.transports.shm import ShmTransport
from gradserve.server.transports.ucx import UcxTransport

TRANSPORTS: dict[int, type[ServerTransport]] = {
    ShmTransport.kind: ShmTransport,
    CudaIpcTransport.kind: CudaIpcTransport,
    UcxTransport.kind: UcxTransport,
}

__all__ = ["TRANSPORTS", "CudaIpcTransport", "Refusal", "ServerTransport", "SessionSettings",
           "ShmTransport", "UcxTransport"]
