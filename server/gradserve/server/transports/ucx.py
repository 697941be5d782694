"""The UCX transport, server side: a link to a client's UCX worker, for clients on
other hosts.

``create`` connects to the worker address the client sent (endpoint error
handling on), sends the link's nonce over UCX and posts the receive of the
client's copy; ``confirm`` uses the link once the client proved the nonce over
gRPC and its own copy came back over UCX, which shows that both directions
work. Links hold no memory: receives allocate per call, counted by the
server's in-flight bound. The data path is
:class:`~gradserve.wire.ucx.LinkTransport`'s.
"""

from __future__ import annotations

import hmac
import secrets
import time

from gradserve.errors import StatusError
from gradserve.server.transports.base import Budget, NewRegion, NextIndex, Refusal, \
    ServerTransport, SessionSettings
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import ucx
from gradserve.wire.slots import NONCE_BYTES, Region

#: Most seconds ``ConfirmSession`` waits for the client's copy of the nonce.
ECHO_SECONDS = 5.0


class UcxTransport(ucx.LinkTransport, ServerTransport):
    """A session's UCX link to its client."""

    @classmethod
    def create(cls, request: pb.TransportRequest, settings: SessionSettings, budget: Budget,
               next_index: NextIndex) -> tuple["UcxTransport", list[NewRegion]]:
        why = ucx.available()
        if why:
            raise Refusal(f"the server cannot use UCX: {why}")
        if not request.address:
            raise Refusal("the request names no UCX worker address")
        transport = cls(0, settings, budget)
        try:
            link = ucx.Link(transport.use_worker(), secrets.randbits(32), ucx.SERVER,
                            settings.transfer_timeout)
            region = Region(next_index(), cls.kind, pb.LINK, "", 0, link)
            transport.add(region)   # closing the transport closes the link, whatever fails
            nonce = secrets.token_bytes(NONCE_BYTES)
            try:
                link.connect(request.address)
                link.proof["nonce"] = link.send(memoryview(nonce),
                                                ucx.tag(link.id, ucx.SERVER, 0))
                link.proof["echo"] = link.receive(NONCE_BYTES, False,
                                                  ucx.tag(link.id, ucx.CLIENT, 0))
            except Exception as err:   # an address ucx refuses; the link broken at once
                raise Refusal(f"cannot connect to the client's UCX worker "
                              f"({type(err).__name__}: "
                              f"{err.message if isinstance(err, StatusError) else err})"
                              ) from None
        except BaseException:
            transport.close()
            raise
        return transport, [NewRegion(region, link.worker.address, nonce, link=link.id)]

    def confirm(self, region: Region) -> bool:
        link: ucx.Link = region.memory
        sent, echoed = link.proof.get("nonce"), link.proof.get("echo")
        if sent is None or echoed is None:
            return False
        try:
            got = echoed.wait(time.monotonic() + ECHO_SECONDS)
        except StatusError as err:
            link.broke(f"the client's nonce did not come back over UCX: {err.message}")
            return False
        nonce = sent.data
        if not (isinstance(got, memoryview) and isinstance(nonce, memoryview)
                and hmac.compare_digest(got.tobytes(), nonce.tobytes())):
            link.broke("the nonce that came back over UCX does not match")
            return False
        region.ready = True
        return True
