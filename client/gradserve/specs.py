"""Plain data types describing endpoints: tensor specs, endpoint info, stats."""

from __future__ import annotations

from dataclasses import dataclass, field

from gradserve import dtypes
from gradserve.v1 import gradserve_pb2 as pb


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of a tensor; ``None`` dims (or dtype) match anything."""

    shape: tuple[int | None, ...]
    dtype: str | None = None

    def to_pb(self, name: str = "") -> pb.TensorSpec:
        return pb.TensorSpec(name=name,
                             dtype=dtypes.code_of(self.dtype) if self.dtype else pb.DTYPE_UNSPECIFIED,
                             shape=[-1 if d is None else d for d in self.shape])

    @classmethod
    def from_pb(cls, msg: pb.TensorSpec) -> "TensorSpec":
        return cls(tuple(None if d < 0 else d for d in msg.shape),
                   dtypes.NAMES.get(msg.dtype))

    def mismatch(self, shape: tuple[int, ...], dtype: str) -> str | None:
        """Why a tensor of ``shape``/``dtype`` does not fit, or None if it does."""
        if self.dtype is not None and dtype != self.dtype:
            return f"expected dtype {self.dtype}, got {dtype}"
        if len(shape) != len(self.shape) or any(
                want is not None and want != got for want, got in zip(self.shape, shape)):
            want = "(" + ", ".join("*" if d is None else str(d) for d in self.shape) + ")"
            return f"expected shape {want}, got {tuple(shape)}"
        return None

    def __str__(self) -> str:
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"{self.dtype or 'any'}[{dims}]"


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
        return cls(msg.count, msg.bytes, msg.max_bytes, msg.ttl_seconds, msg.evictions,
                   msg.endpoint_count)


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
    residuals: ResidualStats | None = None

    @classmethod
    def from_pb(cls, msg: pb.EndpointInfo, residuals: pb.ResidualStats | None = None) -> "EndpointInfo":
        def specs(items):
            return {s.name: TensorSpec.from_pb(s) for s in items}
        return cls(msg.name, msg.framework, msg.device, msg.signature, msg.doc,
                   specs(msg.inputs), specs(msg.outputs), specs(msg.parameters),
                   msg.accepts_parameters, msg.batchable,
                   ResidualStats.from_pb(residuals) if residuals is not None else None)
