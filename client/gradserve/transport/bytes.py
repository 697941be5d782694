"""The bytes transport: tensor payloads inside the gRPC stream itself.

Small tensors go inline in the header frame; larger ones follow as ``Chunk``
frames of at most ``chunk_bytes`` each, so no single gRPC message grows with
the tensor (gRPC caps messages at 2 GiB and servers usually far lower).

The receiving side checks every tensor's dtype x shape against its payload
and the request's size limit *before* allocating anything.
"""

from __future__ import annotations

import mmap
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc

from gradserve.codec import abstract_tensors, tensor_nbytes, tensors
from gradserve.errors import StatusError, invalid
from gradserve.frameworks import DeviceBytes, WireTensor
from gradserve.transport import Data, Peer
from gradserve.v1 import gradserve_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20
#: Stream buffers up to this size come from the heap (warm, fast); larger ones are
#: anonymous maps whose pages are committed only as bytes arrive.
EAGER_BUFFER_BYTES = 64 << 20
#: Room for a header's non-tensor content on top of its inline payloads.
MESSAGE_OVERHEAD = 1 << 20


class FrameWriter:
    """Collects payloads while a header is encoded, then yields the frames.

    Each payload is offered to the session's zero-copy ``peers`` (see
    ``transport.Peer``) in turn; one that places it sends a slot reference,
    and ``placed`` lists ``(peer, ref)`` for the slots the owner must free.
    The rest go inline or as chunk streams (GPU memory copied to the host).
    """

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, inline_bytes: int | None = None,
                 peers: Sequence[Peer] = ()):
        self.chunk_bytes = chunk_bytes
        self._inline_left = chunk_bytes if inline_bytes is None else inline_bytes
        self._streams: list[memoryview] = []
        self._peers = peers
        self._used: list[Peer] = []
        self.placed: list[tuple[Peer, Any]] = []

    def put(self, msg: pb.Tensor, tensor: WireTensor) -> None:
        data = tensor.data
        for peer in self._peers:
            if data.nbytes >= peer.min_bytes and peer.accepts(data):
                placed = peer.place(data)
                if placed is not None:
                    ref, allocated = placed
                    getattr(msg, peer.kind).CopyFrom(ref)
                    if allocated:
                        self.placed.append((peer, ref))
                    if peer not in self._used:
                        self._used.append(peer)
                    return
        if isinstance(data, DeviceBytes):
            data = data.host()
            return self.put(msg, WireTensor(tensor.dtype, tensor.shape, data))
        n = data.nbytes
        if n <= self._inline_left:
            self._inline_left -= n
            msg.data = data.tobytes()
        else:
            msg.stream.id = len(self._streams)
            self._streams.append(data.cast("B"))

    def free_placed(self) -> None:
        """Return every slot this writer allocated (the peer no longer needs them)."""
        free_slots(self.placed)
        self.placed = []

    def frames(self, frame_type: type, header: Any) -> Iterator[Any]:
        """The header frame, then every streamed tensor's chunks in order."""
        for peer in self._used:   # what the peers hold must be ready before they see it
            peer.flush()
        yield frame_type(header=header)
        step = self.chunk_bytes
        for stream_id, data in enumerate(self._streams):
            for offset in range(0, len(data), step):
                yield frame_type(chunk=pb.Chunk(id=stream_id, data=data[offset:offset + step].tobytes()))


def free_slots(placed: Iterable[tuple[Peer, Any]]) -> None:
    """Return ``(peer, ref)`` slots to their peers."""
    for peer, ref in placed:
        peer.free([ref])


class FrameReader:
    """Reassembles one framed message; implements ``PayloadReader``.

    A header that declares a huge tensor costs little until its bytes are
    really sent: buffers over ``EAGER_BUFFER_BYTES`` are anonymous memory maps
    committed page by page as chunks arrive. ``peers_for(header)`` gives the
    session's zero-copy peers that references refer to (by payload kind).
    ``on_frame`` is called for every frame (the server's idle-stream watchdog).
    """

    def __init__(self, max_bytes: int, on_frame: Callable[[], None] | None = None,
                 peers_for: Callable[[Any], Sequence[Peer]] | None = None):
        self.max_bytes = max_bytes
        self._on_frame = on_frame
        self._peers_for = peers_for
        self.peers: Sequence[Peer] = ()
        self._by_kind: dict[str, Peer] = {}
        #: bytes of large payloads that came as bytes although a shared-memory
        #: peer was there: its arena was full (the receiver may grow it)
        self.spilled = 0
        self._expected: dict[int, tuple[str, int]] = {}
        self._buffers: dict[int, bytearray | mmap.mmap] = {}
        self._filled: dict[int, int] = {}

    def read(self, frames: Iterable[Any]) -> Any:
        """Consume ``frames`` and return the validated header message."""
        it = iter(frames)
        first = next(it, None)
        if first is None or first.WhichOneof("frame") != "header":
            raise invalid("stream must start with a header frame")
        header = first.header
        if self._peers_for is not None:
            self.peers = self._peers_for(header)
            self._by_kind = {peer.kind: peer for peer in self.peers}
        self._plan(header)
        for frame in it:
            if self._on_frame is not None:
                self._on_frame()
            if frame.WhichOneof("frame") != "chunk":
                raise invalid("only chunk frames may follow the header")
            self._append(frame.chunk)
        for stream_id, (path, size) in self._expected.items():
            got = self._filled.get(stream_id, 0)
            if got != size:
                raise invalid(f"{path}: stream ended after {got} of {size} bytes")
        return header

    def _plan(self, header: Any) -> None:
        total = 0
        shm = self._by_kind.get("shm")
        for path, msg in tensors(header):
            size = tensor_nbytes(path, msg)
            total += size
            kind = msg.WhichOneof("payload")
            if shm is not None and kind in ("data", "stream") and size >= shm.min_bytes:
                self.spilled += size
            if kind == "data":
                if len(msg.data) != size:
                    raise invalid(f"{path}: payload has {len(msg.data)} bytes but dtype "
                                  f"{msg.dtype} x shape {list(msg.shape)} needs {size}")
            elif kind == "stream":
                if msg.stream.id in self._expected:
                    raise invalid(f"{path}: stream id {msg.stream.id} used twice")
                self._expected[msg.stream.id] = (path, size)
            elif kind in self._by_kind:
                self._by_kind[kind].check(getattr(msg, kind), size, path)
            else:
                raise invalid(f"{path}: tensor has no payload this transport can read ({kind})")
        for path, spec in abstract_tensors(header):
            total += tensor_nbytes(path, spec)
        if total > self.max_bytes:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"message carries {total} tensor bytes, over the limit of "
                              f"{self.max_bytes}")

    def _append(self, chunk: pb.Chunk) -> None:
        if chunk.id not in self._expected:
            raise invalid(f"chunk for unknown stream id {chunk.id}")
        path, size = self._expected[chunk.id]
        start = self._filled.get(chunk.id, 0)
        end = start + len(chunk.data)
        if end > size:
            raise invalid(f"{path}: stream carries more than the {size} bytes its shape needs")
        buf = self._buffers.get(chunk.id)
        if buf is None:
            buf = self._buffers[chunk.id] = (bytearray(size) if size <= EAGER_BUFFER_BYTES
                                             else mmap.mmap(-1, size))
        buf[start:end] = chunk.data
        self._filled[chunk.id] = end

    def get(self, msg: pb.Tensor) -> Data:
        kind = msg.WhichOneof("payload")
        if kind == "data":
            return memoryview(bytearray(msg.data))
        if kind in self._by_kind:
            return self._by_kind[kind].view(getattr(msg, kind))
        buf = self._buffers.get(msg.stream.id)
        return memoryview(buf) if buf is not None else memoryview(bytearray(0))
