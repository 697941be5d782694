"""The framework-neutral client of a gradserve server or of several replicas of one.

``Client`` routes calls over its replicas (:mod:`gradserve.client.fleet`), each of
which speaks the protocol to one server (:mod:`gradserve.client.replica`: framing,
codec, error mapping, residual lifetime, the same-host session). Autograd front-ends (``client.torch(...)``,
``client.jax(...)``, found through :mod:`gradserve.frameworks`) build on its
``call_forward``/``call_vjp``; the low-level ``forward``/``vjp`` methods expose
the same RPCs on numpy arrays (or any framework's arrays).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence, TypeVar

import grpc

from gradserve import frameworks
from gradserve.client.calls import Call, Level, Residual
from gradserve.client.fleet import Fleet, parse_target, resolve, split_port
from gradserve.client.replica import UNREACHABLE, Replica, ReplicaInfo, Settings
from gradserve.client.transports import TRANSPORTS
from gradserve.frameworks import Statics
from gradserve.errors import (GradserveError, RemoteError, ResidualMissing, Unavailable,
                              from_rpc_error)
from gradserve.security import TLSConfig, tls_config, token_from
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire import codec, dtypes, pytree
from gradserve.wire.codec import Arguments, MakeLeaf
from gradserve.wire.framing import DEFAULT_CHUNK_BYTES, FrameReader, FrameWriter
from gradserve.wire.memory import Data, WireTensor, copy_into
from gradserve.wire.slots import SessionInfo
from gradserve.wire.specs import EndpointInfo, TensorType

#: ``transport=`` values: "auto", "grpc" (bytes in the gRPC stream), then each same-host one,
#: then "ucx" (across hosts).
TRANSPORT_NAMES = ("auto", "grpc", *TRANSPORTS)
log = logging.getLogger("gradserve.client")
T = TypeVar("T")

#: Gradients mirror a call's inputs: ``args``, ``kwargs``, ``parameters``.
Gradients = Arguments


@dataclass
class ForwardResult:
    """Outputs of a low-level ``Client.forward`` and the residual for ``vjp``."""

    outputs: Any
    residual: Residual | None


def numpy_leaf(wire: WireTensor, path: str) -> Any:
    """Decode a wire tensor to a numpy array (the low-level API's array type)."""
    return frameworks.adapter("numpy").from_wire(wire)


def _differentiable_leaf(x: Any) -> bool:
    adapter = frameworks.adapter_for(x)
    return adapter is not None and adapter.wire_dtype(x) in dtypes.DIFFERENTIABLE


class Client:
    """A client of one gradserve server, or of several replicas of one.

    ``target`` is one address (``host:port``), a list of addresses, ``ipv4:a:p,b:p``
    (``ipv6:[a]:p,...``), or ``dns:///name:port`` (every address the name resolves to,
    resolved again every ``resolve_seconds`` and after failures: a Kubernetes headless
    Service). Over several replicas each Forward goes to the less loaded of two healthy
    ones picked at random, each Vjp to the replica holding its residual; a Forward refused
    as unavailable (a replica gone or draining) is sent to another, and a Vjp whose replica
    is gone is sent elsewhere with its inputs and recomputed (``recomputes`` counts them).
    Every replica's health (``grpc.health.v1``) is watched from ``open`` to ``close``;
    ``replicas()`` shows what the client sees.

    ``timeout`` (seconds) is the default deadline of every call;
    ``chunk_bytes`` is the largest gRPC message this client sends.
    ``transport`` (the value asked for; ``client.transport`` is the one in use):
    ``"grpc"`` sends tensor bytes in the gRPC stream;
    ``"shm"`` moves them through shared memory (same host only);
    ``"cuda_ipc"`` also moves GPU tensors through CUDA IPC pools on the GPUs
    both sides see (CPU tensors of the same call use shared memory); a forced
    transport that cannot work raises when it is negotiated (``connect``, or
    the first call). ``"auto"`` takes the best of these that works, for each replica,
    saying why it did not get a better one in ``fallback_reason``; a server not reachable
    yet is asked again on later calls, so a client started before its server
    still gets shared memory. ``arena_bytes`` sizes the shared-memory regions'
    first pair and ``cuda_pool_bytes`` the CUDA IPC pools (0: the server's defaults).
    ``channel`` replaces the channel the client would open to its one address (a test
    seam, or a channel with interceptors); ``close`` leaves an injected channel open. A
    backward whose server is unavailable is re-sent (with its inputs) until its
    deadline, or for ``retry_seconds`` where it has none. ``tls`` (True: verify the
    server against the system's roots; a ``TLSConfig``: a CA, a client certificate for
    mutual TLS, the name to verify, which for a ``dns:`` target defaults to its name;
    None: ``$GRADSERVE_TLS_CA`` and its companions if set; False: plaintext) opens TLS
    channels; ``token`` (default ``$GRADSERVE_TOKEN``) is sent with every call as
    ``authorization: Bearer <token>``. ``resolver(name)`` replaces the DNS lookup of
    ``dns:`` names (``host:port`` -> the ``ip:port`` addresses; a test seam, or service
    discovery of your own).
    """

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 transport: str = "auto", arena_bytes: int = 0, cuda_pool_bytes: int = 0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_receive_bytes: int = 1 << 42,
                 options: Iterable[tuple[str, Any]] = (), channel: grpc.Channel | None = None,
                 retry_seconds: float = 30.0, tls: bool | TLSConfig | None = None,
                 token: str | None = None, resolve_seconds: float = 30.0,
                 resolver: Callable[[str], list[str]] | None = None):
        if transport not in TRANSPORT_NAMES:
            raise ValueError(f"transport must be one of {TRANSPORT_NAMES}, got {transport!r}")
        self.target = target
        #: the target, for messages
        self.address = target if isinstance(target, str) else ",".join(target)
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.max_receive_bytes = max_receive_bytes
        self.requested = transport
        self.retry_seconds = retry_seconds
        self.tls = tls_config(tls)
        self._settings = Settings(transport, {"shm": arena_bytes, "cuda_ipc": cuda_pool_bytes},
                                  chunk_bytes, max_receive_bytes)
        self._options = [("grpc.max_receive_message_length", -1),
                         ("grpc.max_send_message_length", -1), *options]
        self._token = token_from(token)
        fixed, names = parse_target(target)
        if channel is not None and (len(fixed) != 1 or names):
            raise ValueError("channel= stands for one server: give one address with it")
        self._closed = False
        self._count_lock = threading.Lock()
        self._recomputes = 0
        self._fleet = Fleet(target, _opener(self._settings, self._options, self.tls,
                                            self._token, channel),
                            resolve_seconds=resolve_seconds, resolver=resolver or resolve)

    # -- lifecycle ---------------------------------------------------------
    def open(self) -> "Client":
        """Negotiate each replica's same-host transport now (``connect`` does; a forced
        transport that cannot work raises here, a server not reachable yet is asked again
        later) and start watching the replicas' health."""
        for replica in self._fleet.replicas():
            replica.negotiate()
        self._fleet.start()
        return self

    def close(self) -> None:
        """Release every residual the servers hold for this client (best effort), end the
        sessions, stop watching, close the channels."""
        if self._closed:
            return
        self._closed = True
        self._fleet.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def replicas(self) -> list[ReplicaInfo]:
        """What the client sees of each replica: address, health, calls in flight,
        transport, and the Forwards, Vjps and failures it sent there."""
        return [r.info() for r in self._fleet.replicas()]

    @property
    def recomputes(self) -> int:
        """Vjps sent again with their inputs because their residual's replica no longer
        had it, was gone or was unavailable (the server recomputes unless it still held it)."""
        return self._recomputes

    def _primary(self) -> Replica:
        replicas = self._fleet.replicas()
        if not replicas:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                              f"{self.address} names no reachable replica")
        return replicas[0]

    @property
    def transport(self) -> str:
        """The transport in use (of the first replica, over several): the best of the
        session's, or "grpc" without one."""
        return self._primary().transport

    @property
    def fallback_reason(self) -> str:
        """Why the (first) replica's transport is not a better one ("" when it is the best)."""
        return self._primary().fallback_reason

    def session_info(self) -> SessionInfo | None:
        """The (first) replica's same-host session (regions, pending frees, copy counters)."""
        return self._primary().session_info()

    @property
    def stub(self) -> pb_grpc.GradserveStub:
        """The (first) replica's gRPC stub (its token and identity go with every call): for
        requests no front-end makes, such as a test's hand-made ones."""
        return self._primary().stub

    @property
    def pending_releases(self) -> int:
        """Residuals dropped here whose release no server has been sent yet."""
        return sum(len(r.released) for r in [*self._fleet.replicas(), *self._fleet.retired()])

    # -- discovery ---------------------------------------------------------
    def endpoints(self, *, timeout: float | None = None) -> list[EndpointInfo]:
        """Every endpoint the server hosts."""
        reply = self._any(lambda r, left: r.unary(r.stub.ListEndpoints,
                                                  pb.ListEndpointsRequest(), left), timeout)
        return [EndpointInfo.from_pb(e) for e in reply.endpoints]

    def describe(self, name: str, *, timeout: float | None = None) -> EndpointInfo:
        """One endpoint's details, the server's residual statistics, each instance's load
        and (for an endpoint that batches) what batching did (of one replica, over several)."""
        reply = self._any(lambda r, left: r.unary(r.stub.Describe,
                                                  pb.DescribeRequest(endpoint=name), left),
                          timeout)
        return EndpointInfo.from_pb(reply.endpoint, reply.residuals,
                                    reply.batches if reply.HasField("batches") else None,
                                    reply.instances, reply.process)

    def parameters(self, name: str, *, like: str = "numpy",
                   timeout: float | None = None) -> dict[str, Any]:
        """The endpoint's own parameter values, as arrays of framework ``like``."""
        adapter = frameworks.adapter(like)

        def fetch(replica: Replica, left: float | None) -> dict[str, Any]:
            replica.flush_releases(left)
            reader: FrameReader[Any] = FrameReader(self.max_receive_bytes)
            frames = replica.invoke(replica.stub.GetParameters,
                                    pb.GetParametersRequest(endpoint=name), left)
            try:
                header = reader.read(frames)
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            found: dict[str, Any] = codec.decode(header, reader,
                                                 lambda wire, path: adapter.from_wire(wire),
                                                 "parameters")
            return found

        return self._any(fetch, timeout)

    # -- low-level differentiable calls ------------------------------------
    def forward(self, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                *, parameters: Any = None, need_vjp: bool = False,
                timeout: float | None = None) -> ForwardResult:
        """Run the endpoint on numpy arrays (or any framework's arrays).

        With ``need_vjp`` every floating-point input is differentiable and the
        result carries a residual for :meth:`vjp`.
        """
        call = Call(name, Arguments(tuple(args), dict(kwargs or {}), parameters),
                    _differentiable_leaf if need_vjp else None)
        outputs, residual = self.call_forward(call, numpy_leaf, need_vjp=need_vjp, timeout=timeout)
        return ForwardResult(outputs, residual)

    def vjp(self, residual: Residual, cotangents: Any, *, batched: bool = False,
            timeout: float | None = None) -> Arguments:
        """Vector-Jacobian product for the inputs a ``forward(need_vjp=True)`` flagged.

        With ``batched``, cotangents carry an extra leading axis of B vectors and
        the gradients come back with it: B products in one call.
        """
        return self.call_vjp(residual, cotangents, numpy_leaf, batched=batched, timeout=timeout)

    def jvp(self, name: str, args: tuple[Any, ...], tangents: tuple[Any, ...],
            kwargs: dict[str, Any] | None = None, kwarg_tangents: dict[str, Any] | None = None,
            *, batched: bool = False, timeout: float | None = None) -> tuple[Any, Any]:
        """Forward mode on numpy arrays: the outputs and their tangents (mirroring them,
        None where an output has none) for ``tangents`` mirroring ``args`` (and
        ``kwarg_tangents`` mirroring ``kwargs``; None where an input has none).

        With ``batched``, tangents carry an extra leading axis of B vectors and so do the
        output tangents: B Jacobian-vector products in one call.
        """
        call = Call(name, Arguments(tuple(args), dict(kwargs or {})))
        given = Arguments(tuple(tangents), dict(kwarg_tangents or {}))
        return self.call_jvp(call, given, numpy_leaf, batched=batched, timeout=timeout)

    def signature(self, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                  parameters: Any = None, *, timeout: float | None = None) -> Any:
        """Output types of a call whose tensors are given as :class:`TensorType` leaves, or
        as arrays, which stand for their types (nothing runs on the server)."""
        def as_type(x: Any) -> Any:
            adapter = frameworks.adapter_for(x)
            assert adapter is not None
            return TensorType(tuple(int(d) for d in x.shape), dtypes.name_of(adapter.wire_dtype(x)))

        tree = pytree.map_leaves(as_type, (tuple(args), dict(kwargs or {}), parameters),
                                 lambda x: frameworks.adapter_for(x) is not None)
        request = pb.ForwardRequest(endpoint=name)
        codec.encode_arguments(Arguments(*tree), FrameWriter(), request)
        reply = self._any(lambda r, left: r.unary(r.stub.Signature,
                                                  pb.SignatureRequest(call=request), left),
                          timeout)
        reader: FrameReader[Any] = FrameReader(self.max_receive_bytes)
        outputs = reader.read_header(reply.outputs)
        return codec.decode(outputs, reader, numpy_leaf, "outputs", abstract=True)

    def release(self, *residuals: Residual, timeout: float | None = None) -> int:
        """Free residuals on their servers now; returns how many they still held."""
        by_holder: dict[Replica, list[str]] = {}
        for r in residuals:
            if r.id and isinstance(r.holder, Replica):
                by_holder.setdefault(r.holder, []).append(r.id)
            r.detach()
        released, failure = 0, None
        for holder, ids in by_holder.items():
            if holder.closed:
                continue
            try:
                released += holder.release(ids, self._deadline(timeout))
            except RemoteError as err:   # sent again with that replica's next call
                holder.released.extend(ids)
                failure = failure or err
        if failure is not None:
            raise failure
        return released

    # -- arrays in the session's request slots -----------------------------
    def empty(self, shape: tuple[int, ...], dtype: Any = "float32", *, like: str = "torch",
              device: Any = None) -> Any:
        """An uninitialised array of framework ``like`` ("torch", "numpy", "jax") that
        lives in a request slot of a replica's same-host session: sending it there copies
        nothing (to another replica, it is copied like any array). A ``device`` on a GPU
        (torch) puts it in that GPU's CUDA IPC pool. Without a session (or with its
        regions full) it is an ordinary array."""
        adapter = frameworks.adapter(like)
        code = adapter.dtype_code(dtype)
        shape = tuple(int(d) for d in shape)
        data = self._allocate(adapter, code, shape, device)
        if data is None:
            return adapter.empty(shape, code, device)
        return adapter.from_wire(WireTensor(code, shape, data))

    def as_shared(self, array: Any) -> Any:
        """A copy of ``array`` (torch, numpy or JAX) in a request slot (see :meth:`empty`);
        an ordinary copy, on the array's device, where no slot can be had."""
        adapter = frameworks.adapter_for(array)
        if adapter is None:
            raise TypeError(f"as_shared needs an array, got {type(array).__name__}")
        code, shape = adapter.wire_dtype(array), tuple(int(d) for d in array.shape)
        data = self._allocate(adapter, code, shape, adapter.device(array))
        if data is None:
            return adapter.copy(array)
        copy_into(data, adapter.to_wire(array).data)
        return adapter.from_wire(WireTensor(code, shape, data))

    def _allocate(self, adapter: frameworks.ArrayAdapter, code: int, shape: tuple[int, ...],
                  device: Any) -> Data | None:
        """A request slot for an array of ``adapter``'s framework on ``device``, or None."""
        self._check_open()
        nbytes = dtypes.nbytes(code, shape)
        gpu = adapter.gpu(device)
        replica = self._fleet.pick()
        if replica is None or not nbytes or gpu == frameworks.NO_SLOT:
            return None
        return replica.allocate(nbytes, gpu)

    # -- autograd front-ends -----------------------------------------------
    def torch(self, name: str, *, timeout: float | None = None) -> Any:
        """The endpoint as a differentiable function of torch tensors."""
        return _frontend("torch").RemoteFunction(self, name, timeout=timeout)

    def torch_module(self, name: str, *, timeout: float | None = None) -> Any:
        """A ``torch.nn.Module`` holding local, trainable copies of the endpoint's parameters."""
        return _frontend("torch").RemoteModule(self, name, timeout=timeout)

    def jax(self, name: str, *, timeout: float | None = None, **options: Any) -> Any:
        """The endpoint as a differentiable function of ``jax.Array`` pytrees."""
        return _frontend("jax").RemoteJaxFunction(self, name, timeout=timeout, **options)

    def jax_params(self, name: str, *, timeout: float | None = None) -> Any:
        """The endpoint's parameters as a pytree of ``jax.Array`` (for ``f.apply(params, ...)``)."""
        return self.parameters(name, like="jax", timeout=timeout)

    # -- the protocol, for front-ends --------------------------------------
    def call_forward(self, call: Call, make_leaf: MakeLeaf, *, need_vjp: bool,
                     timeout: float | None = None,
                     statics: Statics | None = None) -> tuple[Any, Residual | None]:
        """Send a Forward (to another replica if the one picked is unavailable); returns
        the decoded outputs (``statics``: the framework whose dtypes, devices and named
        tuples they hold; default numpy's) and, with ``need_vjp``, a residual."""
        limit, until = self._budget(timeout)
        found: tuple[Any, Residual | None] = self._routed(
            "forward", lambda r: r.forward(call, make_leaf, need_vjp, _left(limit, until),
                                           statics), until, persist=False)
        return found

    def call_jvp(self, call: Call, tangents: Arguments, make_leaf: MakeLeaf, *,
                 batched: bool = False, timeout: float | None = None,
                 statics: Statics | None = None) -> tuple[Any, Any]:
        """Send a Jvp (forward mode; to another replica if the one picked is unavailable):
        the decoded outputs and their tangents, for ``tangents`` mirroring the call's
        inputs (None where an input has none). With ``batched``, every tangent has an extra
        leading axis and so do the output tangents."""
        limit, until = self._budget(timeout)
        found: tuple[Any, Any] = self._routed(
            "forward", lambda r: r.jvp(call, tangents, make_leaf, batched, _left(limit, until),
                                       statics), until, persist=False)
        return found

    def call_vjp(self, residual: Residual, cotangents: Any, make_leaf: MakeLeaf, *,
                 batched: bool = False, timeout: float | None = None,
                 statics: Statics | None = None) -> Arguments:
        """Send a Vjp to the replica holding the residual. Where it lost the residual, is
        gone or unavailable (restarting, draining), the inputs go along and the Vjp goes
        to any replica, again until the call's deadline (``timeout``, else the client's,
        else ``retry_seconds``) has passed.

        With ``batched``, every cotangent has an extra leading axis and so do the gradients.
        """
        grads, _ = self._vjp(residual, Level(cotangents, batched), make_leaf, False, timeout,
                             statics)
        return grads

    def call_vjp_kept(self, residual: Residual, cotangents: Any, make_leaf: MakeLeaf, *,
                      requires_grad: Callable[[Any], bool] | None = None,
                      batched: bool = False, timeout: float | None = None,
                      statics: Statics | None = None) -> tuple[Arguments, Residual]:
        """As ``call_vjp``, keeping the graph (higher-order reverse mode): the gradients and
        the residual of the call that made them, whose inputs are ``((args, kwargs,
        parameters, cotangents), {}, {})`` of this one (``requires_grad`` flags the
        cotangents to differentiate too) and whose outputs are the gradients' tuple
        ``(args, kwargs, parameters)``. Its Vjp recomputes every level if it must."""
        grads, kept = self._vjp(residual, Level(cotangents, batched, requires_grad), make_leaf,
                                True, timeout, statics)
        assert kept is not None
        return grads, kept

    def _vjp(self, residual: Residual, level: Level, make_leaf: MakeLeaf, keep: bool,
             timeout: float | None, statics: Statics | None
             ) -> tuple[Arguments, Residual | None]:
        limit, until = self._budget(timeout)
        holder = residual.holder
        if (residual.id and isinstance(holder, Replica) and not holder.closed
                and holder.health != UNREACHABLE):
            try:
                with holder.counted("vjp"):
                    return holder.vjp(residual, level, make_leaf, False, keep,
                                      _left(limit, until), statics)
            except ResidualMissing:
                residual.detach()
            except Unavailable as err:   # the id goes along with the inputs: a server back
                self._failed(holder, err)  # may hold it
                if time.monotonic() >= until:
                    raise
            except GradserveError:
                if not holder.closed or self._closed:
                    raise   # (a retired replica closed as the call began: go elsewhere)
        with self._count_lock:
            self._recomputes += 1
        return self._routed(
            "vjp", lambda r: r.vjp(residual, level, make_leaf, True, keep, _left(limit, until),
                                   statics), until, persist=True)

    # -- routing -----------------------------------------------------------
    def _routed(self, kind: str, attempt: Callable[[Replica], T], until: float,
                persist: bool) -> T:
        """Run ``attempt`` on a replica picked for it; one refused as unavailable makes it
        go to another not tried yet, and, with ``persist``, once all were tried, to them
        again after a pause, until ``until``."""
        tried: set[Replica] = set()
        pause = 0.05
        self._fleet.flush_draining()
        while True:
            self._check_open()
            replica = self._fleet.pick(tried)
            if replica is None:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                                  f"{self.address} names no replica to call (none resolved)")
            try:
                with replica.counted(kind):
                    return attempt(replica)
            except Unavailable as err:
                self._failed(replica, err)
                tried.add(replica)
                if self._fleet.pick(tried, last_resort=False) is not None:
                    continue   # another replica not known to be draining: at once
                if not persist or time.monotonic() + pause >= until:
                    raise
                log.info("gradserve: %s unavailable; re-sending the call in %.2f s",
                         self.address, pause)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                tried.clear()
            except GradserveError:
                if not replica.closed or self._closed:
                    raise
                tried.add(replica)   # retired and closed as the call began: another

    def _any(self, attempt: Callable[[Replica, float | None], T],
             timeout: float | None) -> T:
        """A call any replica can answer (another if the one picked is unavailable)."""
        limit, until = self._budget(timeout)
        return self._routed("other", lambda r: attempt(r, _left(limit, until)), until,
                            persist=False)

    def _failed(self, replica: Replica, err: Unavailable) -> None:
        replica.failed(err)
        self._fleet.failed()
        log.info("gradserve: replica %s unavailable (%s)", replica.address, err.message)

    def _budget(self, timeout: float | None) -> tuple[float | None, float]:
        """A call's deadline in seconds (None: none) and when its retries end."""
        limit = self._deadline(timeout)
        return limit, time.monotonic() + (limit if limit is not None else self.retry_seconds)

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _check_open(self) -> None:
        if self._closed:
            raise GradserveError(f"this client of {self.address} is closed")


def _opener(settings: Settings, options: list[tuple[str, Any]], tls: TLSConfig | None,
            token: str | None, channel: grpc.Channel | None) -> Callable[[str, str], Replica]:
    """How a client opens a replica for an address (found under the ``dns:`` name ``name``,
    or "") on a new channel, or the injected one (it holds nothing of the client, so a
    client dropped without ``close`` is freed)."""
    def open_replica(address: str, name: str) -> Replica:
        if channel is not None:
            return Replica(address, channel, settings, token, owns_channel=False)
        if tls is not None:
            named = []
            if name and tls.server_name is None:   # certificates name the service, not its
                named = [("grpc.ssl_target_name_override", split_port(name)[0])]   # addresses
            made = grpc.secure_channel(address, tls.channel_credentials(),
                                       options=[*options, *tls.channel_options(), *named])
        else:
            made = grpc.insecure_channel(address, options=options)
        return Replica(address, made, settings, token)
    return open_replica


def _left(limit: float | None, until: float) -> float | None:
    """Seconds left of a call's deadline (None: it has none)."""
    return max(until - time.monotonic(), 0.0) if limit is not None else None

def _frontend(name: str) -> ModuleType:
    return importlib.import_module(frameworks.framework(name).frontend)


def connect(target: str | Sequence[str], **options: Any) -> Client:
    """Open a :class:`Client` to the gradserve server at ``host:port`` (or to the replicas
    a list, ``ipv4:``/``ipv6:`` list or ``dns:///name:port`` names), negotiate its
    transports and watch its replicas (see :class:`Client` for the options)."""
    return Client(target, **options).open()
