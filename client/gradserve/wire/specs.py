"""Plain data types describing tensors and endpoints: tensor types and specs, endpoint info."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Iterable

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import dtypes


@dataclass(frozen=True, eq=False)
class TensorType:
    """A concrete tensor type: every dimension and the dtype known (e.g. an abstract
    input of :meth:`Client.signature`, or one of its results). It equals the
    :class:`TensorSpec` that has no wildcard and matches it."""

    shape: tuple[int, ...]
    dtype: str

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TensorSpec):
            other = other.concrete()
        if isinstance(other, TensorType):
            return (tuple(self.shape), self.dtype) == (tuple(other.shape), other.dtype)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((tuple(self.shape), self.dtype))

    def to_pb(self, name: str = "") -> pb.TensorSpec:
        """The wire form."""
        return pb.TensorSpec(name=name, dtype=dtypes.code_of(self.dtype), shape=self.shape)

    @classmethod
    def from_pb(cls, msg: pb.TensorSpec) -> "TensorType":
        """Read the wire form (every dimension and the dtype must be known)."""
        return cls(tuple(msg.shape), dtypes.name_of(msg.dtype))

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class TensorSpec:
    """A pattern of tensor types, declared by an endpoint: ``None`` dims (or dtype) match
    anything."""

    shape: tuple[int | None, ...]
    dtype: str | None = None

    def to_pb(self, name: str = "") -> pb.TensorSpec:
        """The wire form (-1 for a wildcard dimension)."""
        return pb.TensorSpec(name=name,
                             dtype=dtypes.code_of(self.dtype) if self.dtype else pb.DTYPE_UNSPECIFIED,
                             shape=[-1 if d is None else d for d in self.shape])

    @classmethod
    def from_pb(cls, msg: pb.TensorSpec) -> "TensorSpec":
        """Read the wire form."""
        return cls(tuple(None if d < 0 else d for d in msg.shape), dtypes.NAMES.get(msg.dtype))

    def concrete(self) -> TensorType | None:
        """The one type this spec matches, if it has no wildcard."""
        if self.dtype is None or any(d is None for d in self.shape):
            return None
        return TensorType(tuple(d for d in self.shape if d is not None), self.dtype)

    def mismatch(self, t: TensorType) -> str | None:
        """Why a tensor of type ``t`` does not fit, or None if it does."""
        if self.dtype is not None and t.dtype != self.dtype:
            return f"expected dtype {self.dtype}, got {t.dtype}"
        if len(t.shape) != len(self.shape) or any(
                want is not None and want != got for want, got in zip(self.shape, t.shape)):
            return f"expected shape ({self._dims()}), got {tuple(t.shape)}"
        return None

    def _dims(self) -> str:
        return ", ".join("*" if d is None else str(d) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype or 'any'}[{self._dims()}]"


@dataclass(frozen=True)
class ResidualStats:
    """What a server's residual store holds right now."""

    count: int
    bytes: int
    max_bytes: int
    ttl_seconds: float
    evictions: int
    endpoint_count: int

    @classmethod
    def from_pb(cls, msg: pb.ResidualStats) -> "ResidualStats":
        """Read the wire form."""
        return cls(msg.count, msg.bytes, msg.max_bytes, msg.ttl_seconds, msg.evictions,
                   msg.endpoint_count)


@dataclass(frozen=True)
class BatchStats:
    """What dynamic batching did for one endpoint since its server started."""

    forward_runs: int
    forward_calls: int
    forward_rows: int
    vjp_runs: int
    vjp_calls: int
    queue_seconds: float
    max_calls: int

    @classmethod
    def from_pb(cls, msg: pb.BatchStats) -> "BatchStats":
        """Read the wire form."""
        return cls(msg.forward_runs, msg.forward_calls, msg.forward_rows, msg.vjp_runs,
                   msg.vjp_calls, msg.queue_seconds, msg.max_calls)

    @property
    def mean_batch(self) -> float:
        """Forward calls one model run served, on average (0 before any ran)."""
        return self.forward_calls / self.forward_runs if self.forward_runs else 0.0

    @property
    def mean_queue_seconds(self) -> float:
        """How long a call waited for its run to start, on average."""
        calls = self.forward_calls + self.vjp_calls
        return self.queue_seconds / calls if calls else 0.0


@dataclass(frozen=True)
class InstanceStats:
    """One instance (device) of an endpoint and its load, as ``Describe`` reports it."""

    index: int
    device: str
    in_flight: int
    forward_calls: int
    vjp_calls: int

    @classmethod
    def from_pb(cls, msg: pb.InstanceStats) -> "InstanceStats":
        """Read the wire form."""
        return cls(msg.index, msg.device, msg.in_flight, msg.forward_calls, msg.vjp_calls)


def _specs(items: Iterable[pb.TensorSpec]) -> dict[str, TensorSpec]:
    return {s.name: TensorSpec.from_pb(s) for s in items}


#: A token naming this process, sent in ``DescribeResponse.process``.
PROCESS = secrets.token_hex(8)


@dataclass(frozen=True)
class EndpointInfo:
    """An endpoint as ``ListEndpoints``/``Describe`` report it."""

    name: str
    framework: str
    device: str
    signature: str
    doc: str = ""
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)
    parameters: dict[str, TensorSpec] = field(default_factory=dict)
    accepts_parameters: bool = False
    batchable: bool = False
    #: dynamic batching: most rows one merged run takes (0: calls are never merged)
    max_batch: int = 0
    #: dynamic batching: longest a call waits for others to join it, in seconds
    max_delay: float = 0.0
    residuals: ResidualStats | None = None
    #: what batching did (``Describe`` of an endpoint that batches)
    batches: BatchStats | None = None
    #: the devices it is hosted on, one instance each (``device`` is the first)
    devices: tuple[str, ...] = ()
    #: each instance's load (``Describe``)
    instances: tuple[InstanceStats, ...] = ()
    #: highest order of reverse mode a call gets (1: gradients, not gradients of them)
    reverse_order: int = 1
    #: whether forward mode (Jvp) is served
    forward_mode: bool = False
    #: whether the server runs in this very process (``Describe``)
    same_process: bool = False

    @classmethod
    def from_pb(cls, msg: pb.EndpointInfo, residuals: pb.ResidualStats | None = None,
                batches: pb.BatchStats | None = None,
                instances: Iterable[pb.InstanceStats] = (),
                process: str = "") -> "EndpointInfo":
        """Read the wire form (with the statistics ``Describe`` adds)."""
        return cls(msg.name, msg.framework, msg.device, msg.signature, msg.doc,
                   _specs(msg.inputs), _specs(msg.outputs), _specs(msg.parameters),
                   msg.accepts_parameters, msg.batchable, msg.batching.max_batch,
                   msg.batching.max_delay_seconds,
                   ResidualStats.from_pb(residuals) if residuals is not None else None,
                   BatchStats.from_pb(batches) if batches is not None else None,
                   tuple(msg.devices) or (msg.device,),
                   tuple(InstanceStats.from_pb(i) for i in instances),
                   msg.derivatives.reverse_order if msg.HasField("derivatives") else 1,
                   msg.derivatives.forward, process == PROCESS)
