"""The client's shared-memory session: open, prove same host, keep alive, close."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import grpc

from gradserve.errors import GradserveError, from_rpc_error
from gradserve.transport import shm
from gradserve.v1 import gradserve_pb2 as pb

log = logging.getLogger("gradserve.client")


class ShmSession:
    """A confirmed session: the mapped arenas (``peer``) and a keep-alive thread."""

    def __init__(self, stub: Any, arena_bytes: int = 0, timeout: float = 10.0):
        if not shm.available():
            raise GradserveError("this machine has no /dev/shm")
        try:
            opened = stub.OpenSession(pb.OpenSessionRequest(arena_bytes=arena_bytes),
                                      timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self.id = opened.session_id
        self.lease = opened.lease_seconds
        self._stub = stub
        try:
            probe = shm.open_region(opened.probe_region, 32)
            nonce = bytes(probe[:])
            probe.close()
            self.peer = shm.ClientPeer(*self._map(opened.request_region, opened.reply_region,
                                                  opened.arena_bytes), opened.arena_bytes)
        except (OSError, ValueError) as err:
            self.close()
            raise GradserveError(f"cannot map the server's shared memory ({err}): the server is "
                                 "on another host or in another IPC namespace") from None
        try:
            stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=self.id, nonce=nonce),
                                timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self._grow_lock = threading.Lock()
        self._grown_out = False
        self.peer.grow = self.grow
        self._stopped = threading.Event()
        # the thread holds no reference to the session: a client dropped without close()
        # stops pinging, and the server ends the session when its lease runs out
        weakref.finalize(self, self._stopped.set)
        threading.Thread(target=_keep_alive, name="gradserve-keepalive", daemon=True,
                         args=(stub, self.id, self.lease, self._stopped)).start()

    @staticmethod
    def _map(request_region: str, reply_region: str, size: int) -> tuple:
        return shm.open_region(request_region, size), shm.open_region(reply_region, size)

    def grow(self, nbytes: int, seen: int) -> bool:
        """Add a segment to both arenas that can hold ``nbytes``, unless one was
        added since the caller saw ``seen`` segments. False once the server
        refuses (its per-session limit, or /dev/shm full): from then on what
        does not fit travels as bytes."""
        with self._grow_lock:
            if len(self.peer.segments) > seen:
                return True
            if self._grown_out:
                return False
            try:
                grown = self._stub.GrowSession(
                    pb.GrowSessionRequest(session_id=self.id, min_bytes=nbytes), timeout=10.0)
                maps = self._map(grown.request_region, grown.reply_region, grown.segment_bytes)
                if self.peer.add_segment(*maps, grown.segment_bytes) != grown.segment:
                    raise GradserveError(f"segment {grown.segment} arrived out of order")
                self._stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=self.id,
                                                                   segment=grown.segment),
                                          timeout=10.0)
            except (grpc.RpcError, OSError, ValueError, GradserveError) as err:
                self._grown_out = True
                detail = err.details() if isinstance(err, grpc.RpcError) else err
                log.info("gradserve: shared-memory arenas stay at %d bytes (%s); larger "
                         "payloads travel as bytes", self.peer.size, detail)
                return False
            return True

    def state(self) -> pb.SessionState:
        """This session's id and the reply slots freed since the last request."""
        return pb.SessionState(id=self.id, freed=self.peer.take_freed())

    def close(self) -> None:
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
        try:
            self._stub.CloseSession(pb.SessionRequest(session_id=self.id), timeout=1.0)
        except grpc.RpcError:
            pass   # the lease ends it anyway



def _keep_alive(stub: Any, sid: str, lease: float, stopped: threading.Event) -> None:
    """Ping the server every third of the lease until ``stopped`` or the session is gone."""
    while not stopped.wait(lease / 3):
        try:
            if not stub.KeepAlive(pb.SessionRequest(session_id=sid), timeout=lease / 3).open:
                return   # gone: the next call gets SessionMissing and reopens
        except grpc.RpcError as err:
            log.debug("keep-alive of session %s failed: %s", sid, err)
