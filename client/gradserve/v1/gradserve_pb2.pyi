from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    COMPLEX64: _ClassVar[DType]
    COMPLEX128: _ClassVar[DType]

class RegionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REGION_KIND_UNSPECIFIED: _ClassVar[RegionKind]
    SHARED_MEMORY: _ClassVar[RegionKind]
    CUDA_IPC: _ClassVar[RegionKind]
    UCX: _ClassVar[RegionKind]

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    REQUEST: _ClassVar[Direction]
    REPLY: _ClassVar[Direction]
    PROBE: _ClassVar[Direction]
    LINK: _ClassVar[Direction]
DTYPE_UNSPECIFIED: DType
BOOL: DType
UINT8: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType
FLOAT64: DType
COMPLEX64: DType
COMPLEX128: DType
REGION_KIND_UNSPECIFIED: RegionKind
SHARED_MEMORY: RegionKind
CUDA_IPC: RegionKind
UCX: RegionKind
DIRECTION_UNSPECIFIED: Direction
REQUEST: Direction
REPLY: Direction
PROBE: Direction
LINK: Direction

class StreamedPayload(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "stream", "slot", "transfer", "requires_grad")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    stream: StreamedPayload
    slot: SlotRef
    transfer: Transfer
    requires_grad: bool
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., stream: _Optional[_Union[StreamedPayload, _Mapping]] = ..., slot: _Optional[_Union[SlotRef, _Mapping]] = ..., transfer: _Optional[_Union[Transfer, _Mapping]] = ..., requires_grad: _Optional[bool] = ...) -> None: ...

class SlotRef(_message.Message):
    __slots__ = ("region", "offset", "nbytes", "generation")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    region: int
    offset: int
    nbytes: int
    generation: int
    def __init__(self, region: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("region", "tag", "device")
    REGION_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    region: int
    tag: int
    device: bool
    def __init__(self, region: _Optional[int] = ..., tag: _Optional[int] = ..., device: _Optional[bool] = ...) -> None: ...

class NoneValue(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Mapping(_message.Message):
    __slots__ = ("keys", "values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "none", "bool_value", "int_value", "float_value", "str_value", "list_value", "tuple_value", "dict_value", "abstract", "slice_value", "ellipsis", "complex_value", "constant", "named_value")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STR_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    TUPLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    DICT_VALUE_FIELD_NUMBER: _ClassVar[int]
    ABSTRACT_FIELD_NUMBER: _ClassVar[int]
    SLICE_VALUE_FIELD_NUMBER: _ClassVar[int]
    ELLIPSIS_FIELD_NUMBER: _ClassVar[int]
    COMPLEX_VALUE_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    NAMED_VALUE_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    none: NoneValue
    bool_value: bool
    int_value: int
    float_value: float
    str_value: str
    list_value: Sequence
    tuple_value: Sequence
    dict_value: Mapping
    abstract: TensorSpec
    slice_value: Slice
    ellipsis: EllipsisValue
    complex_value: Complex
    constant: Constant
    named_value: NamedSequence
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., none: _Optional[_Union[NoneValue, _Mapping]] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., str_value: _Optional[str] = ..., list_value: _Optional[_Union[Sequence, _Mapping]] = ..., tuple_value: _Optional[_Union[Sequence, _Mapping]] = ..., dict_value: _Optional[_Union[Mapping, _Mapping]] = ..., abstract: _Optional[_Union[TensorSpec, _Mapping]] = ..., slice_value: _Optional[_Union[Slice, _Mapping]] = ..., ellipsis: _Optional[_Union[EllipsisValue, _Mapping]] = ..., complex_value: _Optional[_Union[Complex, _Mapping]] = ..., constant: _Optional[_Union[Constant, _Mapping]] = ..., named_value: _Optional[_Union[NamedSequence, _Mapping]] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("start", "stop", "step")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    start: Value
    stop: Value
    step: Value
    def __init__(self, start: _Optional[_Union[Value, _Mapping]] = ..., stop: _Optional[_Union[Value, _Mapping]] = ..., step: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class EllipsisValue(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Complex(_message.Message):
    __slots__ = ("real", "imag")
    REAL_FIELD_NUMBER: _ClassVar[int]
    IMAG_FIELD_NUMBER: _ClassVar[int]
    real: float
    imag: float
    def __init__(self, real: _Optional[float] = ..., imag: _Optional[float] = ...) -> None: ...

class Constant(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class NamedSequence(_message.Message):
    __slots__ = ("type_name", "fields", "items")
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    type_name: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, type_name: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ..., items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    data: bytes
    def __init__(self, id: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class EndpointInfo(_message.Message):
    __slots__ = ("name", "framework", "device", "signature", "doc", "inputs", "outputs", "parameters", "accepts_parameters", "batchable", "batching", "devices", "derivatives")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FRAMEWORK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BATCHABLE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DERIVATIVES_FIELD_NUMBER: _ClassVar[int]
    name: str
    framework: str
    device: str
    signature: str
    doc: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    parameters: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    accepts_parameters: bool
    batchable: bool
    batching: Batching
    devices: _containers.RepeatedScalarFieldContainer[str]
    derivatives: Derivatives
    def __init__(self, name: _Optional[str] = ..., framework: _Optional[str] = ..., device: _Optional[str] = ..., signature: _Optional[str] = ..., doc: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., parameters: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., accepts_parameters: _Optional[bool] = ..., batchable: _Optional[bool] = ..., batching: _Optional[_Union[Batching, _Mapping]] = ..., devices: _Optional[_Iterable[str]] = ..., derivatives: _Optional[_Union[Derivatives, _Mapping]] = ...) -> None: ...

class Derivatives(_message.Message):
    __slots__ = ("reverse_order", "forward")
    REVERSE_ORDER_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    reverse_order: int
    forward: bool
    def __init__(self, reverse_order: _Optional[int] = ..., forward: _Optional[bool] = ...) -> None: ...

class Batching(_message.Message):
    __slots__ = ("max_batch", "max_delay_seconds")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    max_delay_seconds: float
    def __init__(self, max_batch: _Optional[int] = ..., max_delay_seconds: _Optional[float] = ...) -> None: ...

class BatchStats(_message.Message):
    __slots__ = ("forward_runs", "forward_calls", "forward_rows", "vjp_runs", "vjp_calls", "queue_seconds", "max_calls")
    FORWARD_RUNS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ROWS_FIELD_NUMBER: _ClassVar[int]
    VJP_RUNS_FIELD_NUMBER: _ClassVar[int]
    VJP_CALLS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_FIELD_NUMBER: _ClassVar[int]
    forward_runs: int
    forward_calls: int
    forward_rows: int
    vjp_runs: int
    vjp_calls: int
    queue_seconds: float
    max_calls: int
    def __init__(self, forward_runs: _Optional[int] = ..., forward_calls: _Optional[int] = ..., forward_rows: _Optional[int] = ..., vjp_runs: _Optional[int] = ..., vjp_calls: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., max_calls: _Optional[int] = ...) -> None: ...

class ResidualStats(_message.Message):
    __slots__ = ("count", "bytes", "max_bytes", "ttl_seconds", "evictions", "endpoint_count")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    bytes: int
    max_bytes: int
    ttl_seconds: float
    evictions: int
    endpoint_count: int
    def __init__(self, count: _Optional[int] = ..., bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., ttl_seconds: _Optional[float] = ..., evictions: _Optional[int] = ..., endpoint_count: _Optional[int] = ...) -> None: ...

class ListEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointInfo]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[EndpointInfo, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("endpoint", "residuals", "batches", "instances", "process")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    endpoint: EndpointInfo
    residuals: ResidualStats
    batches: BatchStats
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStats]
    process: str
    def __init__(self, endpoint: _Optional[_Union[EndpointInfo, _Mapping]] = ..., residuals: _Optional[_Union[ResidualStats, _Mapping]] = ..., batches: _Optional[_Union[BatchStats, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[InstanceStats, _Mapping]]] = ..., process: _Optional[str] = ...) -> None: ...

class InstanceStats(_message.Message):
    __slots__ = ("index", "device", "in_flight", "forward_calls", "vjp_calls")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    VJP_CALLS_FIELD_NUMBER: _ClassVar[int]
    index: int
    device: str
    in_flight: int
    forward_calls: int
    vjp_calls: int
    def __init__(self, index: _Optional[int] = ..., device: _Optional[str] = ..., in_flight: _Optional[int] = ..., forward_calls: _Optional[int] = ..., vjp_calls: _Optional[int] = ...) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class GetParametersFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: Value
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[Value, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("endpoint", "args", "kwargs", "parameters", "need_vjp", "release", "session")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NEED_VJP_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    args: Value
    kwargs: Value
    parameters: Value
    need_vjp: bool
    release: _containers.RepeatedScalarFieldContainer[str]
    session: SessionState
    def __init__(self, endpoint: _Optional[str] = ..., args: _Optional[_Union[Value, _Mapping]] = ..., kwargs: _Optional[_Union[Value, _Mapping]] = ..., parameters: _Optional[_Union[Value, _Mapping]] = ..., need_vjp: _Optional[bool] = ..., release: _Optional[_Iterable[str]] = ..., session: _Optional[_Union[SessionState, _Mapping]] = ...) -> None: ...

class SessionState(_message.Message):
    __slots__ = ("id", "freed_slots")
    ID_FIELD_NUMBER: _ClassVar[int]
    FREED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    freed_slots: _containers.RepeatedCompositeFieldContainer[SlotRef]
    def __init__(self, id: _Optional[str] = ..., freed_slots: _Optional[_Iterable[_Union[SlotRef, _Mapping]]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("outputs", "residual_id")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ID_FIELD_NUMBER: _ClassVar[int]
    outputs: Value
    residual_id: str
    def __init__(self, outputs: _Optional[_Union[Value, _Mapping]] = ..., residual_id: _Optional[str] = ...) -> None: ...

class ForwardFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ForwardRequest
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ForwardRequest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ForwardReplyFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ForwardResponse
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ForwardResponse, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class VjpRequest(_message.Message):
    __slots__ = ("endpoint", "residual_id", "cotangents", "inputs", "batched_cotangents", "session", "keep_graph", "below")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ID_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAPH_FIELD_NUMBER: _ClassVar[int]
    BELOW_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    residual_id: str
    cotangents: Value
    inputs: ForwardRequest
    batched_cotangents: bool
    session: SessionState
    keep_graph: bool
    below: _containers.RepeatedCompositeFieldContainer[VjpLevel]
    def __init__(self, endpoint: _Optional[str] = ..., residual_id: _Optional[str] = ..., cotangents: _Optional[_Union[Value, _Mapping]] = ..., inputs: _Optional[_Union[ForwardRequest, _Mapping]] = ..., batched_cotangents: _Optional[bool] = ..., session: _Optional[_Union[SessionState, _Mapping]] = ..., keep_graph: _Optional[bool] = ..., below: _Optional[_Iterable[_Union[VjpLevel, _Mapping]]] = ...) -> None: ...

class JvpRequest(_message.Message):
    __slots__ = ("endpoint", "args", "kwargs", "parameters", "tangents", "batched_tangents", "session")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_TANGENTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    args: Value
    kwargs: Value
    parameters: Value
    tangents: Tangents
    batched_tangents: bool
    session: SessionState
    def __init__(self, endpoint: _Optional[str] = ..., args: _Optional[_Union[Value, _Mapping]] = ..., kwargs: _Optional[_Union[Value, _Mapping]] = ..., parameters: _Optional[_Union[Value, _Mapping]] = ..., tangents: _Optional[_Union[Tangents, _Mapping]] = ..., batched_tangents: _Optional[bool] = ..., session: _Optional[_Union[SessionState, _Mapping]] = ...) -> None: ...

class Tangents(_message.Message):
    __slots__ = ("args", "kwargs", "parameters")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    args: Value
    kwargs: Value
    parameters: Value
    def __init__(self, args: _Optional[_Union[Value, _Mapping]] = ..., kwargs: _Optional[_Union[Value, _Mapping]] = ..., parameters: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class JvpResponse(_message.Message):
    __slots__ = ("outputs", "tangents")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    outputs: Value
    tangents: Value
    def __init__(self, outputs: _Optional[_Union[Value, _Mapping]] = ..., tangents: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class JvpFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: JvpRequest
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[JvpRequest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class JvpReplyFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: JvpResponse
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[JvpResponse, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class VjpLevel(_message.Message):
    __slots__ = ("cotangents", "batched_cotangents")
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    cotangents: Value
    batched_cotangents: bool
    def __init__(self, cotangents: _Optional[_Union[Value, _Mapping]] = ..., batched_cotangents: _Optional[bool] = ...) -> None: ...

class VjpResponse(_message.Message):
    __slots__ = ("args", "kwargs", "parameters", "residual_id")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ID_FIELD_NUMBER: _ClassVar[int]
    args: Value
    kwargs: Value
    parameters: Value
    residual_id: str
    def __init__(self, args: _Optional[_Union[Value, _Mapping]] = ..., kwargs: _Optional[_Union[Value, _Mapping]] = ..., parameters: _Optional[_Union[Value, _Mapping]] = ..., residual_id: _Optional[str] = ...) -> None: ...

class VjpFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: VjpRequest
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[VjpRequest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class VjpReplyFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: VjpResponse
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[VjpResponse, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SignatureRequest(_message.Message):
    __slots__ = ("call",)
    CALL_FIELD_NUMBER: _ClassVar[int]
    call: ForwardRequest
    def __init__(self, call: _Optional[_Union[ForwardRequest, _Mapping]] = ...) -> None: ...

class SignatureResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: Value
    def __init__(self, outputs: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("residual_ids", "session")
    RESIDUAL_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    residual_ids: _containers.RepeatedScalarFieldContainer[str]
    session: SessionState
    def __init__(self, residual_ids: _Optional[_Iterable[str]] = ..., session: _Optional[_Union[SessionState, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("index", "kind", "direction", "nbytes", "device", "handle", "link")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    index: int
    kind: RegionKind
    direction: Direction
    nbytes: int
    device: str
    handle: bytes
    link: int
    def __init__(self, index: _Optional[int] = ..., kind: _Optional[_Union[RegionKind, str]] = ..., direction: _Optional[_Union[Direction, str]] = ..., nbytes: _Optional[int] = ..., device: _Optional[str] = ..., handle: _Optional[bytes] = ..., link: _Optional[int] = ...) -> None: ...

class TransportRequest(_message.Message):
    __slots__ = ("kind", "region_bytes", "devices", "address")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REGION_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    kind: RegionKind
    region_bytes: int
    devices: _containers.RepeatedScalarFieldContainer[str]
    address: bytes
    def __init__(self, kind: _Optional[_Union[RegionKind, str]] = ..., region_bytes: _Optional[int] = ..., devices: _Optional[_Iterable[str]] = ..., address: _Optional[bytes] = ...) -> None: ...

class TransportRefusal(_message.Message):
    __slots__ = ("kind", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: RegionKind
    reason: str
    def __init__(self, kind: _Optional[_Union[RegionKind, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("transports",)
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    transports: _containers.RepeatedCompositeFieldContainer[TransportRequest]
    def __init__(self, transports: _Optional[_Iterable[_Union[TransportRequest, _Mapping]]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "lease_seconds", "regions", "refused")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    lease_seconds: float
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    refused: _containers.RepeatedCompositeFieldContainer[TransportRefusal]
    def __init__(self, session_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., refused: _Optional[_Iterable[_Union[TransportRefusal, _Mapping]]] = ...) -> None: ...

class RegionProof(_message.Message):
    __slots__ = ("region", "nonce")
    REGION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    region: int
    nonce: bytes
    def __init__(self, region: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class ConfirmSessionRequest(_message.Message):
    __slots__ = ("session_id", "proofs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROOFS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    proofs: _containers.RepeatedCompositeFieldContainer[RegionProof]
    def __init__(self, session_id: _Optional[str] = ..., proofs: _Optional[_Iterable[_Union[RegionProof, _Mapping]]] = ...) -> None: ...

class ConfirmSessionResponse(_message.Message):
    __slots__ = ("ready", "regions", "refused")
    READY_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    ready: _containers.RepeatedScalarFieldContainer[int]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    refused: _containers.RepeatedCompositeFieldContainer[TransportRefusal]
    def __init__(self, ready: _Optional[_Iterable[int]] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., refused: _Optional[_Iterable[_Union[TransportRefusal, _Mapping]]] = ...) -> None: ...

class GrowSessionRequest(_message.Message):
    __slots__ = ("session_id", "min_bytes", "kind")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    min_bytes: int
    kind: RegionKind
    def __init__(self, session_id: _Optional[str] = ..., min_bytes: _Optional[int] = ..., kind: _Optional[_Union[RegionKind, str]] = ...) -> None: ...

class GrowSessionResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    def __init__(self, regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("open",)
    OPEN_FIELD_NUMBER: _ClassVar[int]
    open: bool
    def __init__(self, open: _Optional[bool] = ...) -> None: ...
