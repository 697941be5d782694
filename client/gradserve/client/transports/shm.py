"""The shared-memory transport, client side: same-host CPU payloads that bypass gRPC.

The server creates every region (POSIX shared memory, ``posix_fallocate``d so
a full /dev/shm fails at creation rather than with SIGBUS later) and sends
its name; this side maps it, refusing names that are not gradserve's, and
reads back the nonce at its start, which proves it shares the host's
/dev/shm (a client in another IPC namespace or machine cannot). Regions come
in pairs: a request region this side allocates and writes in, and a reply
region the server writes outputs and gradients to, viewed here without a
copy until the last array viewing a slot is collected.

When no request slot is free the transport grows the session by a pair of
regions (``GrowSession``, doubling, up to the server's per-session limit);
after a reply came as bytes because the server's reply regions were full, it
grows them for the calls that follow. Past the limit, payloads that do not
fit travel as bytes.
"""

from __future__ import annotations

import mmap
import os
import re
from typing import Any

from gradserve.client.transports.base import ClientTransport
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.slots import NONCE_BYTES

SHM_DIR = "/dev/shm"
#: Payloads smaller than this travel inline: a slot costs more than the copy saves. Measured
#: with benchmarks/small_calls.py (2 cores): a Forward+Vjp through shared memory is slower
#: than inline bytes at 64 KiB per tensor and faster at 256 KiB.
SHM_MIN_BYTES = 128 << 10
#: The names a server gives its regions; no other name is ever mapped.
NAME = re.compile(r"^gradserve-(?P<owner>[0-9a-f]{16})-[0-9a-f]{32}-(req|rep|probe)$")


def available() -> str:
    """Why this machine has no usable POSIX shared memory ("" when it has)."""
    if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK):
        return ""
    return f"this machine has no writable {SHM_DIR}"


def open_region(name: str, size: int) -> mmap.mmap:
    """Map a region the server created; refuses names that are not gradserve's."""
    if not NAME.match(name):
        raise ValueError(f"refusing to map {name!r}: not a gradserve region name")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"region {name!r} is not {size} bytes")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class ShmTransport(ClientTransport):
    """Shared-memory regions in /dev/shm; ``region_bytes`` sizes the first pair (0: the
    server's default)."""

    name = "shm"
    kind = pb.SHARED_MEMORY
    min_bytes = SHM_MIN_BYTES

    @staticmethod
    def unavailable() -> str:
        return available()

    def ask(self) -> pb.TransportRequest:
        return pb.TransportRequest(kind=self.kind, region_bytes=self.region_bytes)

    def open(self, msg: pb.Region) -> tuple[Any, int | None, bytes]:
        mapped = open_region(msg.handle.decode("utf-8", "replace"), msg.nbytes)
        nonce = bytes(mapped[:NONCE_BYTES])
        if msg.direction == pb.PROBE:
            mapped.close()
            return None, None, nonce
        return mapped, None, nonce

    def cannot_open(self, msg: pb.Region, err: Exception) -> str:
        return (f"cannot map the server's shared memory ({err}): the server is on another "
                "host or in another IPC namespace")

    def make_room(self, nbytes: int, gpu: int | None) -> bool:
        return self.grow(nbytes)

    def spilled(self, nbytes: int) -> None:
        self.grow(nbytes)
