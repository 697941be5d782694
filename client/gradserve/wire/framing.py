"""Framing: one request or reply as a header frame plus the bytes of its tensors.

A tensor's payload is inline bytes in the header, a stream of ``Chunk``
frames of at most ``chunk_bytes`` each (so no gRPC message grows with the
tensor: gRPC caps messages at 2 GiB and servers usually far lower), or a slot
of the request's same-host session (``SlotRef``), or a transfer over a link of
the session (``Transfer``, sent out of band while the message is). The framing
knows sessions only as a :class:`SlotWriter` (where a sender may place
payloads) and a :class:`SlotReader` (which checks, receives and views
references); which transport carries a payload is the session's business.

The receiving side checks every tensor's dtype x shape against its payload
and the message's size limit *before* allocating anything.
"""

from __future__ import annotations

import mmap
from typing import Any, Callable, Generic, Iterable, Iterator, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from gradserve.errors import StatusError, invalid
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import dtypes
from gradserve.wire.memory import Data, DeviceBytes, synchronize
from gradserve.wire.slots import Ref

DEFAULT_CHUNK_BYTES = 1 << 20
#: Stream buffers up to this size come from the heap (warm, fast) once an eighth of their
#: bytes arrived (memory stays within 8x what was sent); larger ones are anonymous maps
#: whose pages are committed only as bytes arrive.
EAGER_BUFFER_BYTES = 64 << 20
EAGER_FRACTION = 8
#: Room for a header's non-tensor content on top of its inline payloads.
MESSAGE_OVERHEAD = 1 << 20


class SlotWriter(Protocol):
    """Where a sender may put payloads instead of the stream (a same-host session)."""

    def place(self, data: Data, out_of_band: bool = True) -> tuple[Ref, bool] | None:
        """Where ``data`` goes (a slot holding it, or a transfer sending it where
        ``out_of_band`` allows) and whether it was allocated for it; None: send bytes.
        A GPU payload's copy may still be queued: the writer synchronises before sending."""

    def free(self, refs: Iterable[Ref]) -> None:
        """Return what ``place`` allocated (the receiver is done with it, or never will be)."""

    def settle(self, refs: Iterable[Ref]) -> None:
        """Wait until the receiver took what ``refs`` sent out of band."""


class Holder(Protocol):
    """A bound on bytes held across messages (the server's requests in flight)."""

    def take(self, nbytes: int) -> None:
        """Hold ``nbytes`` more, or raise RESOURCE_EXHAUSTED."""

    def give(self, nbytes: int) -> None:
        """Return held bytes."""


class SlotReader(Protocol):
    """Checks and views the slots a message refers to (a same-host session)."""

    @property
    def inline_below(self) -> int:
        """Payloads smaller than this travel as bytes by choice, not for want of a slot."""

    def check(self, ref: pb.SlotRef, nbytes: int, path: str, align: int) -> None:
        """Refuse a reference that is not a readable slot of ``nbytes`` at an offset that is
        a multiple of ``align``."""

    def receive(self, ref: pb.Transfer, nbytes: int, path: str) -> None:
        """Refuse a transfer that is not one of ``nbytes`` the peer may send; else start
        receiving it."""

    def drop(self, ref: Ref) -> None:
        """Stop receiving a transfer that will not be viewed."""

    def view(self, ref: Ref) -> Data:
        """The bytes of a checked reference (a transfer's once they arrived)."""


def tensors(msg: Message, kinds: tuple[str, ...] = ("tensor",)) -> list[tuple[str, str, Any]]:
    """Every tensor leaf of the given ``kinds`` ("tensor", "abstract") inside a message, in
    order: (readable path such as ``args[0]``, kind, leaf)."""
    found: list[tuple[str, str, Any]] = []
    stack: list[tuple[str, Any]] = [("", msg)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, pb.Value):
            which = node.WhichOneof("kind")
            if which in kinds:
                found.append((path, which, getattr(node, which)))
            elif which in ("list_value", "tuple_value"):
                items = getattr(node, which).items
                stack.extend((f"{path}[{i}]", items[i]) for i in reversed(range(len(items))))
            elif which == "dict_value":
                keys, values = node.dict_value.keys, node.dict_value.values
                stack.extend((f"{path}[{keys[i]!r}]", values[i])
                             for i in reversed(range(min(len(keys), len(values)))))
            continue
        for field, val in reversed(node.ListFields()):
            if field.message_type is None:
                continue
            sub = f"{path}.{field.name}" if path else field.name
            if field.is_repeated:
                stack.extend((f"{sub}[{i}]", val[i]) for i in reversed(range(len(val))))
            else:
                stack.append((sub, val))
    return found


def _holds_values(descriptor: Any, seen: set[str] | None = None) -> bool:
    """Whether messages of this type can contain a ``Value``."""
    if descriptor.full_name == pb.Value.DESCRIPTOR.full_name:
        return True
    seen = seen if seen is not None else set()
    if descriptor.full_name in seen:
        return False
    seen.add(descriptor.full_name)
    return any(f.message_type is not None and _holds_values(f.message_type, seen)
               for f in descriptor.fields)


_VALUE_HOLDERS: dict[str, bool] = {}


def count_values(msg: Message, limit: int) -> int:
    """How many pytree nodes (``Value``s) ``msg`` holds, counting no further than ``limit + 1``
    (fields that cannot hold one are not walked)."""
    count = 0
    stack: list[Message] = [msg]
    while stack and count <= limit:
        node = stack.pop()
        if isinstance(node, pb.Value):
            count += 1
        for field, val in node.ListFields():
            kind = field.message_type
            if kind is None:
                continue
            holds = _VALUE_HOLDERS.get(kind.full_name)
            if holds is None:
                holds = _VALUE_HOLDERS[kind.full_name] = _holds_values(kind)
            if holds:
                if field.is_repeated:
                    stack.extend(val)
                else:
                    stack.append(val)
    return count


def tensor_nbytes(path: str, msg: pb.Tensor | pb.TensorSpec) -> int:
    """Validated byte size of a tensor message (dtype known, dims non-negative)."""
    try:
        return dtypes.nbytes(msg.dtype, tuple(msg.shape))
    except StatusError as err:
        raise invalid(f"{path or 'tensor'}: {err}") from None


class FrameWriter:
    """Collects payloads while a header is encoded, then yields the frames.

    Each payload is offered to ``slots`` first; a placed one travels as a slot
    reference, and ``placed`` lists the slots allocated for this message (the
    owner frees them when the receiver is done). The rest go inline or as chunk
    streams (GPU memory copied to the host). ``flush`` must run before the
    header is sent: it waits for the GPU work on this message's slots (queued
    copies into them, or kernels that wrote the arrays already there), until
    when the writer keeps the copies' sources alive. Payloads sent out of band (only
    where ``out_of_band``) need the streaming call, whose end ``frames(settle=True)``
    waits for until the receiver took them.
    """

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, inline_bytes: int | None = None,
                 slots: SlotWriter | None = None, out_of_band: bool = True):
        self.chunk_bytes = chunk_bytes
        self._inline_left = chunk_bytes if inline_bytes is None else inline_bytes
        self._streams: list[memoryview] = []
        self._slots = slots
        self._out_of_band = out_of_band
        self._sources: list[Data] = []   # placed, maybe still being copied from
        self._devices: set[int] = set()   # GPUs holding this message's slots
        self.placed: list[Ref] = []
        #: payload bytes put so far
        self.nbytes = 0

    def put(self, msg: pb.Tensor, data: Data) -> None:
        """Set ``msg``'s payload so the receiver can recover ``data``."""
        self.nbytes += data.nbytes
        if self._slots is not None and data.nbytes:
            placed = self._slots.place(data, self._out_of_band)
            if placed is None and isinstance(data, DeviceBytes):
                data = data.host()
                placed = self._slots.place(data, self._out_of_band)
            if placed is not None:
                ref, allocated = placed
                if isinstance(ref, pb.Transfer):
                    msg.transfer.CopyFrom(ref)
                    self.placed.append(ref)
                    return
                msg.slot.CopyFrom(ref)
                if isinstance(data, DeviceBytes):
                    self._devices.add(data.device)
                if allocated:
                    self.placed.append(ref)
                    self._sources.append(data)
                return
        if isinstance(data, DeviceBytes):
            data = data.host()
        if data.nbytes <= self._inline_left:
            self._inline_left -= data.nbytes
            msg.data = data.tobytes()
        else:
            msg.stream.id = len(self._streams)
            self._streams.append(data.cast("B"))

    def flush(self) -> None:
        """Make what the slots hold ready for the receiver (before the header is sent)."""
        for device in sorted(self._devices):
            synchronize(device)
        self._devices.clear()
        self._sources = []

    @property
    def one_message(self) -> bool:
        """Whether the header alone carries every payload (no chunk frames follow, nothing
        is sent out of band)."""
        return not self._streams and not self._transfers

    @property
    def _transfers(self) -> list[pb.Transfer]:
        return [ref for ref in self.placed if isinstance(ref, pb.Transfer)]

    def drop_transfers(self) -> None:
        """Cancel the sends of this message's transfers (a wait for one ends CANCELLED);
        done already where the receiver took them."""
        transfers = self._transfers
        if self._slots is not None and transfers:
            self._slots.free(transfers)

    def free_placed(self) -> None:
        """Return the slots allocated for this message (the receiver is done with them)."""
        if self._slots is not None and self.placed:
            self._slots.free(self.placed)
        self.placed = []

    def frames(self, frame_type: type, header: Any, settle: bool = False) -> Iterator[Any]:
        """The header frame, then every streamed tensor's chunks in order; with ``settle``,
        the end waits until the receiver took the payloads sent out of band (which are let
        go of however the frames end)."""
        try:
            self.flush()
            yield frame_type(header=header)
            step = self.chunk_bytes
            for stream_id, data in enumerate(self._streams):
                for offset in range(0, len(data), step):
                    yield frame_type(chunk=pb.Chunk(id=stream_id,
                                                    data=data[offset:offset + step].tobytes()))
            transfers = self._transfers
            if settle and self._slots is not None and transfers:
                self._slots.settle(transfers)
        finally:
            if settle:
                self.drop_transfers()


S = TypeVar("S", bound=SlotReader)


class FrameReader(Generic[S]):
    """Reassembles one framed message; ``get`` gives each tensor's bytes.

    A header that declares a huge tensor costs little until its bytes are
    really sent: buffers over ``EAGER_BUFFER_BYTES`` are anonymous memory maps
    committed page by page as chunks arrive. ``slots_for(header)`` gives the
    session whose slots the header's references name (None: no session).
    ``on_frame`` is called with every frame's size (the server's stream watchdog).
    """

    def __init__(self, max_bytes: int, on_frame: Callable[[int], None] | None = None,
                 slots_for: Callable[[Any], S | None] | None = None,
                 max_values: int | None = None, holder: Holder | None = None):
        self.max_bytes = max_bytes
        self.max_values = max_values
        self._holder = holder
        self._held = 0
        #: called with every frame's size (settable: a watch may start after construction)
        self.on_frame = on_frame
        self._slots_for = slots_for
        self.slots: S | None = None
        #: the largest payload that came as bytes although the session could have held it
        #: in a slot: the sender's regions were full (the receiver may grow them)
        self.spilled = 0
        self._unviewed: dict[tuple[int, int], pb.SlotRef] = {}
        self._receiving: dict[tuple[int, int], pb.Transfer] = {}
        self._expected: dict[int, tuple[str, int]] = {}
        self._buffers: dict[int, bytearray | mmap.mmap] = {}
        self._pending: dict[int, bytearray] = {}   # bytes of streams not yet given a buffer
        self._filled: dict[int, int] = {}
        #: whether the message named slots of a same-host session
        self.used_slots = False
        #: tensor bytes the header declares (once read)
        self.nbytes = 0
        #: header bytes other than inline tensors: structure, static values, names (once
        #: read, where ``max_values`` is set)
        self.structure_bytes = 0

    def read(self, frames: Iterable[Any]) -> Any:
        """Consume ``frames`` and return the validated header message."""
        it = iter(frames)
        first = next(it, None)
        if first is None or first.WhichOneof("frame") != "header":
            raise invalid("stream must start with a header frame")
        header = self._start(first.header)
        for frame in it:
            if frame.WhichOneof("frame") != "chunk":
                raise invalid("only chunk frames may follow the header")
            chunk = frame.chunk
            data = chunk.data   # each read of a bytes field copies it
            if self.on_frame is not None:
                self.on_frame(len(data))
            self._append(chunk.id, data)
        for stream_id, (path, size) in self._expected.items():
            got = self._filled.get(stream_id, 0)
            if got != size:
                raise invalid(f"{path}: stream ended after {got} of {size} bytes")
        return header

    def read_header(self, header: Any) -> Any:
        """Validate the whole message of a one-message call (request or reply), which
        streams no tensor, and return it."""
        self._start(header)
        if self._expected:
            path, _ = next(iter(self._expected.values()))
            raise invalid(f"{path}: a one-message call carries its tensors inline or in "
                          "slots; streamed tensors need the streaming call")
        return header

    def _start(self, header: Any) -> Any:
        size = 0
        if self.on_frame is not None or self.max_values is not None:
            size = header.ByteSize()
        if self.on_frame is not None:
            self.on_frame(size)
        if self._slots_for is not None:
            self.slots = self._slots_for(header)
        self._plan(header, size)
        return header

    def _plan(self, header: Any, header_bytes: int) -> None:
        # every Value takes at least two bytes: small headers cannot be over the limit
        if (self.max_values is not None and header_bytes > 2 * self.max_values
                and count_values(header, self.max_values) > self.max_values):
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"message holds more than {self.max_values} pytree nodes, this "
                              "server's limit")
        total = held = inline = 0
        transfers: list[tuple[pb.Transfer, int, str]] = []
        slots = self.slots
        inline_below = slots.inline_below if slots is not None else 1 << 62
        for path, leaf, msg in tensors(header, ("tensor", "abstract")):
            size = tensor_nbytes(path, msg)
            total += size
            if leaf == "abstract":
                continue
            kind = msg.WhichOneof("payload")
            if kind in ("data", "stream", "transfer"):
                held += size
                if size >= inline_below:
                    self.spilled = max(self.spilled, size)
            if kind == "data":
                if len(msg.data) != size:
                    raise invalid(f"{path}: payload has {len(msg.data)} bytes but dtype "
                                  f"{msg.dtype} x shape {list(msg.shape)} needs {size}")
                inline += size
            elif kind == "stream":
                if msg.stream.id in self._expected:
                    raise invalid(f"{path}: stream id {msg.stream.id} used twice")
                self._expected[msg.stream.id] = (path, size)
            elif kind == "slot":
                if slots is None:
                    raise invalid(f"{path}: a slot reference needs a same-host session, and "
                                  "this message names none")
                slots.check(msg.slot, size, path, dtypes.ITEMSIZE[msg.dtype])
                self.used_slots = True
                self._unviewed[(msg.slot.region, msg.slot.offset)] = msg.slot
            elif kind == "transfer":
                if slots is None:
                    raise invalid(f"{path}: a transfer needs a session with a link, and this "
                                  "message names no session")
                transfers.append((msg.transfer, size, path))
            else:
                raise invalid(f"{path}: tensor has no payload")
        self.nbytes = total
        self.structure_bytes = max(0, header_bytes - inline)
        if total > self.max_bytes:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"message carries {total} tensor bytes, over the limit of "
                              f"{self.max_bytes}")
        if self._holder is not None and held:
            self._holder.take(held)
            self._held = held
        for ref, size, path in transfers:   # receives allocate: only within the limits
            assert slots is not None
            slots.receive(ref, size, path)
            self._receiving[(ref.region, ref.tag)] = ref

    def _append(self, stream_id: int, data: bytes) -> None:
        if stream_id not in self._expected:
            raise invalid(f"chunk for unknown stream id {stream_id}")
        path, size = self._expected[stream_id]
        start = self._filled.get(stream_id, 0)
        end = start + len(data)
        if end > size:
            raise invalid(f"{path}: stream carries more than the {size} bytes its shape needs")
        self._filled[stream_id] = end
        buf = self._buffers.get(stream_id)
        if buf is None:
            if size > EAGER_BUFFER_BYTES:
                buf = self._buffers[stream_id] = mmap.mmap(-1, size)
            elif end * EAGER_FRACTION >= size:
                buf = self._buffers[stream_id] = bytearray(size)
                pending = self._pending.pop(stream_id, b"")
                buf[:len(pending)] = pending
            else:
                self._pending.setdefault(stream_id, bytearray()).extend(data)
                return
        buf[start:end] = data

    def close(self) -> None:
        """Let go of every buffer now (a failed call's reader may live on in a traceback;
        arrays made from a buffer keep it alive themselves) and of the bytes held."""
        self._buffers.clear()
        self._pending.clear()
        self.drop_transfers()
        held, self._held = self._held, 0
        if self._holder is not None and held:
            self._holder.give(held)

    def drop_transfers(self) -> None:
        """Cancel the receives of transfers not viewed yet (a wait for one ends CANCELLED):
        the call failed, or was cancelled."""
        receiving, self._receiving = list(self._receiving.values()), {}
        if receiving and self.slots is not None:
            for ref in receiving:
                self.slots.drop(ref)

    @property
    def chunked(self) -> bool:
        """Whether the message streamed some tensor in chunk frames."""
        return bool(self._expected)

    def unviewed(self) -> list[pb.SlotRef]:
        """Slots the header named that were never viewed (to report free after a failure)."""
        return list(self._unviewed.values())

    def get(self, msg: pb.Tensor) -> Data:
        """The bytes of one tensor of the header ``read`` returned."""
        kind = msg.WhichOneof("payload")
        if kind == "data":
            return memoryview(bytearray(msg.data))
        if kind == "slot":
            assert self.slots is not None
            data = self.slots.view(msg.slot)
            self._unviewed.pop((msg.slot.region, msg.slot.offset), None)
            return data
        if kind == "transfer":
            assert self.slots is not None
            try:   # while it waits, drop_transfers can cancel it
                return self.slots.view(msg.transfer)
            finally:
                self._receiving.pop((msg.transfer.region, msg.transfer.tag), None)
        buf = self._buffers.get(msg.stream.id)
        return memoryview(buf) if buf is not None else memoryview(bytearray(0))
