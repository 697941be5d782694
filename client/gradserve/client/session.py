"""The client's same-host session: open, prove same host (and same GPU), keep alive, close.

A session always has shared-memory arenas (``shm``); asked to, it also opens
the server's CUDA IPC pools on the GPUs both sides see (``cuda``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import grpc

from gradserve.errors import GradserveError, from_rpc_error
from gradserve.transport import cuda_ipc, shm
from gradserve.v1 import gradserve_pb2 as pb

log = logging.getLogger("gradserve.client")


class Session:
    """A confirmed session: the mapped arenas (``shm``), the CUDA IPC pools if any
    (``cuda``, else None with the reason in ``cuda_reason``) and a keep-alive thread."""

    def __init__(self, stub: Any, arena_bytes: int = 0, *, cuda: bool = False,
                 cuda_pool_bytes: int = 0, timeout: float = 10.0):
        if not shm.available():
            raise GradserveError("this machine has no /dev/shm")
        request = pb.OpenSessionRequest(arena_bytes=arena_bytes, cuda_pool_bytes=cuda_pool_bytes)
        self.cuda: cuda_ipc.ClientCudaPeer | None = None
        self.cuda_reason = cuda_ipc.unavailable() if cuda else "not asked for"
        self.cuda_asked = not self.cuda_reason   # asked for, and this process has GPUs
        if self.cuda_asked:
            request.cuda_devices.extend(cuda_ipc.local_devices())
        try:
            opened = stub.OpenSession(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self.id = opened.session_id
        self.lease = opened.lease_seconds
        self._stub = stub
        try:
            probe = shm.open_region(opened.probe_region, 32)
            nonce = bytes(probe[:])
            probe.close()
            self.shm = shm.ClientPeer(*self._map(opened.request_region, opened.reply_region,
                                                 opened.arena_bytes), opened.arena_bytes)
        except (OSError, ValueError) as err:
            self.close()
            raise GradserveError(f"cannot map the server's shared memory ({err}): the server is "
                                 "on another host or in another IPC namespace") from None
        confirm = pb.ConfirmSessionRequest(session_id=self.id, nonce=nonce)
        if opened.cuda_pools:
            self.cuda, nonces, failures = cuda_ipc.ClientCudaPeer.open(opened.cuda_pools)
            confirm.cuda_nonces.extend(nonces)
            self.cuda_reason = "; ".join(failures)
        elif not self.cuda_reason:
            self.cuda_reason = opened.cuda_unavailable or "the server made no CUDA IPC pools"
        try:
            confirmed = stub.ConfirmSession(confirm, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if self.cuda is not None:
            self.cuda.confirmed(confirmed.cuda_pools_ready)
            if not self.cuda.usable:
                self.cuda_reason = self.cuda_reason or "the server refused every CUDA IPC pool"
                self.cuda = None
        self.peers = [p for p in (self.cuda, self.shm) if p is not None]
        self._grow_lock = threading.Lock()
        self._grown_out = False
        self.shm.grow = self.grow
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
            if len(self.shm.segments) > seen:
                return True
            if self._grown_out:
                return False
            try:
                grown = self._stub.GrowSession(
                    pb.GrowSessionRequest(session_id=self.id, min_bytes=nbytes), timeout=10.0)
                maps = self._map(grown.request_region, grown.reply_region, grown.segment_bytes)
                if self.shm.add_segment(*maps, grown.segment_bytes) != grown.segment:
                    raise GradserveError(f"segment {grown.segment} arrived out of order")
                self._stub.ConfirmSession(pb.ConfirmSessionRequest(session_id=self.id,
                                                                   segment=grown.segment),
                                          timeout=10.0)
            except (grpc.RpcError, OSError, ValueError, GradserveError) as err:
                self._grown_out = True
                detail = err.details() if isinstance(err, grpc.RpcError) else err
                log.info("gradserve: shared-memory arenas stay at %d bytes (%s); larger "
                         "payloads travel as bytes", self.shm.size, detail)
                return False
            return True

    def state(self) -> pb.SessionState:
        """This session's id and the reply slots freed since the last request."""
        state = pb.SessionState(id=self.id, freed=self.shm.take_freed())
        if self.cuda is not None:
            state.cuda_freed.extend(self.cuda.take_freed())
        return state

    def has_freed(self) -> bool:
        """Whether reply slots wait to be reported freed."""
        return bool(self.shm.freed) or (self.cuda is not None and bool(self.cuda.freed))

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
