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

class StreamedPayload(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "stream", "shm", "cuda", "requires_grad")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    stream: StreamedPayload
    shm: ShmRef
    cuda: CudaRef
    requires_grad: bool
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., stream: _Optional[_Union[StreamedPayload, _Mapping]] = ..., shm: _Optional[_Union[ShmRef, _Mapping]] = ..., cuda: _Optional[_Union[CudaRef, _Mapping]] = ..., requires_grad: _Optional[bool] = ...) -> None: ...

class ShmRef(_message.Message):
    __slots__ = ("offset", "nbytes", "segment")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    offset: int
    nbytes: int
    segment: int
    def __init__(self, offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., segment: _Optional[int] = ...) -> None: ...

class CudaRef(_message.Message):
    __slots__ = ("pool", "offset", "nbytes")
    POOL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    pool: int
    offset: int
    nbytes: int
    def __init__(self, pool: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("tensor", "none", "bool_value", "int_value", "float_value", "str_value", "list_value", "tuple_value", "dict_value", "abstract")
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
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., none: _Optional[_Union[NoneValue, _Mapping]] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., str_value: _Optional[str] = ..., list_value: _Optional[_Union[Sequence, _Mapping]] = ..., tuple_value: _Optional[_Union[Sequence, _Mapping]] = ..., dict_value: _Optional[_Union[Mapping, _Mapping]] = ..., abstract: _Optional[_Union[TensorSpec, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("name", "framework", "device", "signature", "doc", "inputs", "outputs", "parameters", "accepts_parameters", "batchable")
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
    def __init__(self, name: _Optional[str] = ..., framework: _Optional[str] = ..., device: _Optional[str] = ..., signature: _Optional[str] = ..., doc: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., parameters: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., accepts_parameters: _Optional[bool] = ..., batchable: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("endpoint", "residuals")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    endpoint: EndpointInfo
    residuals: ResidualStats
    def __init__(self, endpoint: _Optional[_Union[EndpointInfo, _Mapping]] = ..., residuals: _Optional[_Union[ResidualStats, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("id", "freed", "cuda_freed")
    ID_FIELD_NUMBER: _ClassVar[int]
    FREED_FIELD_NUMBER: _ClassVar[int]
    CUDA_FREED_FIELD_NUMBER: _ClassVar[int]
    id: str
    freed: _containers.RepeatedCompositeFieldContainer[ShmRef]
    cuda_freed: _containers.RepeatedCompositeFieldContainer[CudaRef]
    def __init__(self, id: _Optional[str] = ..., freed: _Optional[_Iterable[_Union[ShmRef, _Mapping]]] = ..., cuda_freed: _Optional[_Iterable[_Union[CudaRef, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("endpoint", "residual_id", "cotangents", "inputs", "batched_cotangents", "session")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ID_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    residual_id: str
    cotangents: Value
    inputs: ForwardRequest
    batched_cotangents: bool
    session: SessionState
    def __init__(self, endpoint: _Optional[str] = ..., residual_id: _Optional[str] = ..., cotangents: _Optional[_Union[Value, _Mapping]] = ..., inputs: _Optional[_Union[ForwardRequest, _Mapping]] = ..., batched_cotangents: _Optional[bool] = ..., session: _Optional[_Union[SessionState, _Mapping]] = ...) -> None: ...

class VjpResponse(_message.Message):
    __slots__ = ("args", "kwargs", "parameters")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    args: Value
    kwargs: Value
    parameters: Value
    def __init__(self, args: _Optional[_Union[Value, _Mapping]] = ..., kwargs: _Optional[_Union[Value, _Mapping]] = ..., parameters: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

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

class OpenSessionRequest(_message.Message):
    __slots__ = ("arena_bytes", "cuda_devices", "cuda_pool_bytes")
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUDA_DEVICES_FIELD_NUMBER: _ClassVar[int]
    CUDA_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    arena_bytes: int
    cuda_devices: _containers.RepeatedScalarFieldContainer[str]
    cuda_pool_bytes: int
    def __init__(self, arena_bytes: _Optional[int] = ..., cuda_devices: _Optional[_Iterable[str]] = ..., cuda_pool_bytes: _Optional[int] = ...) -> None: ...

class CudaPool(_message.Message):
    __slots__ = ("device", "request_handle", "reply_handle", "pool_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REPLY_HANDLE_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    request_handle: bytes
    reply_handle: bytes
    pool_bytes: int
    def __init__(self, device: _Optional[str] = ..., request_handle: _Optional[bytes] = ..., reply_handle: _Optional[bytes] = ..., pool_bytes: _Optional[int] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "probe_region", "request_region", "reply_region", "arena_bytes", "lease_seconds", "cuda_pools", "cuda_unavailable")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROBE_REGION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_REGION_FIELD_NUMBER: _ClassVar[int]
    REPLY_REGION_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CUDA_POOLS_FIELD_NUMBER: _ClassVar[int]
    CUDA_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    probe_region: str
    request_region: str
    reply_region: str
    arena_bytes: int
    lease_seconds: float
    cuda_pools: _containers.RepeatedCompositeFieldContainer[CudaPool]
    cuda_unavailable: str
    def __init__(self, session_id: _Optional[str] = ..., probe_region: _Optional[str] = ..., request_region: _Optional[str] = ..., reply_region: _Optional[str] = ..., arena_bytes: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., cuda_pools: _Optional[_Iterable[_Union[CudaPool, _Mapping]]] = ..., cuda_unavailable: _Optional[str] = ...) -> None: ...

class ConfirmSessionRequest(_message.Message):
    __slots__ = ("session_id", "nonce", "segment", "cuda_nonces")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    CUDA_NONCES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    nonce: bytes
    segment: int
    cuda_nonces: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., segment: _Optional[int] = ..., cuda_nonces: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ConfirmSessionResponse(_message.Message):
    __slots__ = ("cuda_pools_ready",)
    CUDA_POOLS_READY_FIELD_NUMBER: _ClassVar[int]
    cuda_pools_ready: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, cuda_pools_ready: _Optional[_Iterable[bool]] = ...) -> None: ...

class GrowSessionRequest(_message.Message):
    __slots__ = ("session_id", "min_bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    min_bytes: int
    def __init__(self, session_id: _Optional[str] = ..., min_bytes: _Optional[int] = ...) -> None: ...

class GrowSessionResponse(_message.Message):
    __slots__ = ("segment", "request_region", "reply_region", "segment_bytes")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_REGION_FIELD_NUMBER: _ClassVar[int]
    REPLY_REGION_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    segment: int
    request_region: str
    reply_region: str
    segment_bytes: int
    def __init__(self, segment: _Optional[int] = ..., request_region: _Optional[str] = ..., reply_region: _Optional[str] = ..., segment_bytes: _Optional[int] = ...) -> None: ...

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
