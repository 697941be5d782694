"""Transports: how tensor payloads travel between client and server.

The bytes transport (``transport.bytes``) is always there: small payloads
inline in the header frame, larger ones as chunk frames. A same-host session
adds zero-copy *peers*, one per transport module (``transport.shm`` for host
memory, ``transport.cuda_ipc`` for GPU memory), each filling one field of the
``Tensor.payload`` oneof. The frame writer offers every payload to the peers
in turn and sends what none takes as bytes; the frame reader hands each
reference to the peer of its kind. A new transport is one new module with a
``Peer`` for each side, and its payload field in the protocol.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from gradserve.frameworks import DeviceBytes
from gradserve.v1 import gradserve_pb2 as pb

Data = memoryview | DeviceBytes


class PayloadWriter(Protocol):
    def put(self, msg: pb.Tensor, tensor: Any) -> None:
        """Set ``msg``'s payload so the peer can recover ``tensor.data``."""


class PayloadReader(Protocol):
    def get(self, msg: pb.Tensor) -> Data:
        """The validated bytes designated by ``msg``'s payload."""


class Peer(Protocol):
    """One side of a session's zero-copy transport."""

    kind: str        # the ``Tensor.payload`` field its references travel in
    min_bytes: int   # smaller payloads go inline: a slot costs more than the copy

    def accepts(self, data: Data) -> bool:
        """Whether ``data`` lives where this transport can move it (host, or one of its GPUs)."""

    def place(self, data: Data) -> tuple[Any, bool] | None:
        """A reference to a slot holding ``data`` and whether it was allocated for it
        (then the sender frees it); None when full."""

    def flush(self) -> None:
        """Make what ``place`` wrote visible to the peer; called before the message is sent."""

    def check(self, ref: Any, nbytes: int, path: str) -> None:
        """Refuse a reference that is not a slot of ``nbytes`` inside the incoming memory."""

    def view(self, ref: Any) -> Data:
        """The incoming bytes ``ref`` designates, without a copy."""

    def free(self, refs: Iterable[Any]) -> None:
        """Return outgoing slots the other side no longer needs."""
