"""The UCX transport, client side: bulk data to and from a server on another host.

``ask`` sends this process's UCX worker address; the server connects to it and
sends a nonce over UCX. ``open`` connects back to the server's worker, receives
the nonce and sends it back over UCX; the session proves it over gRPC, and the
server uses the link once both copies matched. The data path is
:class:`~gradserve.wire.ucx.LinkTransport`'s.
"""

from __future__ import annotations

import time
from typing import Any

from gradserve.client.transports.base import ClientTransport
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import ucx
from gradserve.wire.slots import NONCE_BYTES

#: Seconds a transfer of this side may take (the server's own bound is its
#: ``transfer_timeout``).
LINK_SECONDS = 60.0
#: Seconds to wait for the server's nonce (a server drops a session unproved within 10 s).
PROOF_SECONDS = 10.0


class UcxTransport(ucx.LinkTransport, ClientTransport):
    """A session's UCX link to a server, for payloads of ``UCX_MIN_BYTES`` and more."""

    same_host = False

    @staticmethod
    def unavailable() -> str:
        return ucx.available()

    def ask(self) -> pb.TransportRequest:
        return pb.TransportRequest(kind=self.kind, address=self.use_worker().address)

    def open(self, msg: pb.Region) -> tuple[Any, int | None, bytes]:
        if msg.direction != pb.LINK:
            raise ValueError(f"a UCX region must be a link, not direction {msg.direction}")
        link = ucx.Link(self.use_worker(), msg.link, ucx.CLIENT, LINK_SECONDS)
        try:
            link.connect(msg.handle)
            deadline = time.monotonic() + PROOF_SECONDS
            got = link.receive(NONCE_BYTES, False, ucx.tag(msg.link, ucx.SERVER, 0)).wait(
                deadline)
            assert isinstance(got, memoryview)
            nonce = got.tobytes()
            link.proof["echo"] = link.send(memoryview(nonce), ucx.tag(msg.link, ucx.CLIENT, 0))
        except BaseException:
            link.close()
            raise
        return link, None, nonce

    def cannot_open(self, msg: pb.Region, err: Exception) -> str:
        return f"cannot reach the server's UCX worker ({type(err).__name__}: {err})"
