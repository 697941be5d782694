"""The ``gradserve`` command line: ``gradserve serve TARGET``, ``gradserve list ADDRESS`` and
``gradserve bench ADDRESS ENDPOINT``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from gradserve.security import TLSConfig
from gradserve.server.auth import Tokens
from gradserve.server.host import Server
from gradserve.server.endpoint import Endpoint, build_endpoint

log = logging.getLogger("gradserve.cli")


def load_target(target: str) -> tuple[str, Any]:
    """Import ``path/file.py:attr`` or ``package.module:attr``; returns (attr name, object)."""
    module_ref, sep, attr = target.rpartition(":")
    if not sep or not module_ref or not attr:
        raise SystemExit(f"gradserve: TARGET must look like module:attr or path/file.py:attr, "
                         f"got {target!r}")
    if module_ref.endswith(".py") or "/" in module_ref:
        path = Path(module_ref).resolve()
        if not path.is_file():
            raise SystemExit(f"gradserve: no such file {module_ref!r}")
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"gradserve: cannot import {module_ref!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_ref)
        except ModuleNotFoundError as err:
            if err.name is None or not module_ref.startswith(err.name):
                raise   # the target exists: an import inside it failed, show where
            raise SystemExit(f"gradserve: no module named {err.name!r} (TARGET "
                             f"{target!r}; is it installed, or on PYTHONPATH?)") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SystemExit(f"gradserve: {module_ref!r} has no attribute {attr!r}") from None
    return attr.split(".")[-1], obj


def _is_factory(obj: Any) -> bool:
    """A callable with no required arguments that is not itself servable (a module,
    an ``Endpoint``, a jitted function, a plain function taking arguments)."""
    if isinstance(obj, Endpoint) or not callable(obj) or inspect.isbuiltin(obj):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


def build_endpoints(name: str, obj: Any, device: str | None) -> dict[str, Endpoint]:
    """Turn a TARGET's object into named endpoints.

    Accepts an ``Endpoint``, a model or function (served by the framework that
    claims it: ``gradserve.server.endpoint.build_endpoint``), a dict of name ->
    any of these, or a factory (a callable with no required arguments, given
    ``device=`` if it accepts one) returning any of these.
    """
    if _is_factory(obj):
        accepts_device = "device" in inspect.signature(obj).parameters
        obj = obj(device=device) if accepts_device and device else obj()
    if isinstance(obj, dict):
        endpoints: dict[str, Endpoint] = {}
        for key, value in obj.items():
            endpoints.update(build_endpoints(str(key), value, device))
        return endpoints
    if isinstance(obj, Endpoint):
        return {name: obj}
    if callable(obj):
        return {name: build_endpoint(obj, device=device)}
    raise SystemExit(f"gradserve: {name!r} is a {type(obj).__name__}, not a module, function, "
                     "Endpoint, dict of those, or a factory returning one")


def serve(args: argparse.Namespace) -> int:
    """``gradserve serve``: host TARGET's endpoints until SIGTERM or SIGINT."""
    attr, obj = load_target(args.target)
    if args.devices is not None and args.device is not None:
        raise SystemExit("gradserve: give --device or --devices, not both")
    instances: dict[str, list[Endpoint]] = {}
    for device in all_devices() if args.devices == ["all"] else args.devices or [args.device]:
        try:
            built = build_endpoints(args.name or attr, obj, device)
        except (RuntimeError, ValueError, AssertionError) as err:
            if device is None:
                raise
            raise SystemExit(f"gradserve: cannot serve {args.target!r} on device {device!r}: "
                             f"{err}") from None
        for name, endpoint in built.items():
            if any(endpoint is other for other in instances.get(name, [])):
                raise SystemExit(f"gradserve: --devices needs a model, function or factory "
                                 f"to build once per device; {name!r} is one Endpoint")
            instances.setdefault(name, []).append(endpoint)
    if not instances:
        raise SystemExit(f"gradserve: {args.target!r} defines no endpoints")
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        tls = TLSConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    try:
        auth = Tokens.load(args.auth_token_file) if args.auth_token_file else None
        server = Server(args.host, args.port, debug=args.debug, reuse_port=args.reuse_port,
                        health_port=args.health_port, tls=tls, auth=auth,
                        tracing=tracer_provider() if args.otel else None,
                        **{option: getattr(args, option) for option, _, _ in SERVER_OPTIONS})
        for name, endpoints in instances.items():
            server.add(name, endpoints)
        server.start()
    except (ValueError, OSError) as err:   # a setting out of range, a port taken, a bad key
        raise SystemExit(f"gradserve: {err}") from None
    health = f" (health also on port {server.health_port})" if server.health_port else ""
    metrics = f", metrics on port {server.metrics_port}" if server.metrics_port else ""
    placed = next(iter(instances.values()))
    devices = (f" on devices {', '.join(str(e.device) for e in placed)}"
               if len(placed) > 1 else "")
    print(f"gradserve: serving {', '.join(instances)} on {server.address}{health}{metrics}"
          f"{devices}", flush=True)
    stopped, hurry = threading.Event(), threading.Event()

    def shutdown(signum: int, frame: Any) -> None:
        if stopped.is_set():
            log.info("signal %d again: stopping now", signum)
            hurry.set()
        else:
            log.info("signal %d: draining for up to %g s (again to stop now)", signum,
                     args.grace)
            stopped.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    stopped.wait()
    emptied = server.drain(args.grace, hurry)
    log.info("drained: %s", "nothing left to answer" if emptied else
             "stopping with calls or residuals left")
    server.stop(grace=0 if hurry.is_set() else 1.0)
    # Everything is released by now. Skip the interpreter's teardown: native thread pools
    # (torch, grpc) sometimes abort in their static destructors ("terminate called without
    # an active exception", SIGABRT), turning a clean stop into a failed exit status.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tracer_provider() -> Any:
    """An OpenTelemetry tracer provider for ``--otel``: spans go to the OTLP exporter
    (configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables) where it is installed,
    else to the console. SystemExit naming the extra if OpenTelemetry is missing."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise SystemExit("gradserve: --otel needs OpenTelemetry: pip install "
                         "'gradserve[otel]'") from None
    exporter: Any
    try:   # optional: not a dependency of the otel extra
        otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        exporter = otlp.OTLPSpanExporter()
    except ImportError:
        log.warning("--otel: no OTLP exporter installed (opentelemetry-exporter-otlp); "
                    "spans go to the console")
        exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME", "gradserve")}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def list_endpoints(args: argparse.Namespace) -> int:
    """``gradserve list``: print a server's endpoints and signatures."""
    import gradserve
    with gradserve.connect(args.address, timeout=args.timeout, transport="grpc",
                           **client_options(args)) as client:
        for info in client.endpoints():
            batch = ", batchable" if info.batchable else ""
            print(f"{info.signature}  [{info.framework} on {info.device}{batch}]")
            if info.doc:
                print(f"    {info.doc.splitlines()[0]}")
            for label, specs in (("input", info.inputs), ("output", info.outputs)):
                for arg, spec in specs.items():
                    print(f"    {label} {arg}: {spec}")
            if info.parameters:
                count = sum(_numel(s.shape) for s in info.parameters.values())
                print(f"    parameters: {len(info.parameters)} tensors, {count} values"
                      f"{' (client may send its own)' if info.accepts_parameters else ''}")
    return 0


def check_health(args: argparse.Namespace) -> int:
    """``gradserve health``: print the server's health status; 0 if SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gradserve.security import identified, tls_config, token_from
    options = client_options(args)
    tls = tls_config(options["tls"])
    channel = (grpc.secure_channel(args.address, tls.channel_credentials(),
                                   options=tls.channel_options())
               if tls is not None else grpc.insecure_channel(args.address))
    with channel:
        stub: Any = health_pb2_grpc.HealthStub(   # its type stubs lack the methods
            identified(channel, token_from(options.get("token"))))
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                               timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"gradserve: {args.address}: {err.code().name}: {err.details()}",
                  file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``connect`` keywords from a client command's TLS and token flags."""
    tls: bool | TLSConfig | None = True if args.tls else None   # None: from $GRADSERVE_TLS_*
    if args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        tls = TLSConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                        server_name=args.tls_server_name)
    options: dict[str, Any] = {"tls": tls}
    if args.token_file:
        try:
            options["token"] = Path(args.token_file).read_text().strip()
        except OSError as err:
            raise SystemExit(f"gradserve: token file {args.token_file!r} cannot be read: "
                             f"{err.strerror}") from None
    return options


def _client_flags(p: argparse.ArgumentParser) -> None:
    """The TLS and token flags of the commands that call a server."""
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS, verifying the server against the system's roots")
    p.add_argument("--tls-ca", default=None, help="PEM file of the CA to verify the server with "
                                                  "(implies --tls)")
    p.add_argument("--tls-cert", default=None, help="PEM file of this client's certificate "
                                                    "(mutual TLS)")
    p.add_argument("--tls-key", default=None, help="PEM file of this client's private key")
    p.add_argument("--tls-server-name", default=None,
                   help="the name the server's certificate must carry, if not the address's")
    p.add_argument("--token-file", default=None,
                   help="file holding this client's token (default: $GRADSERVE_TOKEN)")


def bench(args: argparse.Namespace) -> int:
    """``gradserve bench``: load an endpoint at each concurrency level and print what it did."""
    import json

    from gradserve import loadgen
    from gradserve.errors import GradserveError

    def progress(line: str) -> None:
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()

    shown = sys.stderr.isatty() and not args.json
    try:
        levels = loadgen.run(args.address, args.endpoint, concurrency=args.concurrency,
                             processes=args.processes, duration=args.duration,
                             warmup=args.warmup, shape=args.shape, dtype=args.dtype,
                             rows=args.rows, transport=args.transport, backward=args.backward,
                             timeout=args.timeout, progress=progress if shown else None,
                             connect=client_options(args))
    except GradserveError as err:
        raise loadgen.LoadError(str(err).splitlines()[0] if str(err) else repr(err)) from None
    except KeyboardInterrupt:
        print("\ngradserve: interrupted", file=sys.stderr)
        return 130
    finally:
        if shown:
            progress("")
            sys.stderr.write("\r")
    config = {key: getattr(args, key) for key in (
        "address", "endpoint", "shape", "dtype", "rows", "concurrency", "processes", "duration",
        "warmup", "transport", "backward", "timeout")}
    failed = 1 if any(not lv.calls for lv in levels) else 0   # a level where no call worked
    if args.json:
        print(json.dumps({"config": config, "levels": [lv.as_dict() for lv in levels]}, indent=2))
        return failed
    call = "Forward+Vjp" if args.backward else "Forward"
    print(f"{args.endpoint} at {args.address}: {call} calls, {args.duration:g} s per level "
          f"after {args.warmup:g} s warm-up, transport {args.transport}")
    print(loadgen.render(levels))
    for lv in levels:
        for kind, count in lv.errors.items():
            print(f"concurrency {lv.concurrency}: {count} x {kind}, first: "
                  f"{lv.error_messages.get(kind, '')}")
    return failed


def _device_list(text: str) -> list[str]:
    devices = [part.strip() for part in text.split(",") if part.strip()]
    if not devices:
        raise argparse.ArgumentTypeError(f"expected devices like cuda:0,cuda:1, got {text!r}")
    if "all" in devices and devices != ["all"]:
        raise argparse.ArgumentTypeError("'all' stands alone")
    return devices


def all_devices() -> list[str]:
    """``--devices all``: every GPU torch sees, else every GPU JAX sees, else the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            return [f"cuda:{i}" for i in range(len(jax.devices("gpu")))]
        except RuntimeError:   # no GPU backend
            pass
    return ["cpu"]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 16,256, got {text!r}")
    if any(d < 0 for d in dims):
        raise argparse.ArgumentTypeError(f"dimensions must not be negative, got {text!r}")
    return dims


def _dtype(text: str) -> str:
    from gradserve.wire import dtypes
    if text not in dtypes.BY_NAME:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; one of "
                                         f"{', '.join(dtypes.BY_NAME)}")
    return text


def _positive(kind: Callable[[str], Any], zero: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not 0 <= value < math.inf or (value == 0 and not zero):   # NaN too
            raise argparse.ArgumentTypeError(f"must be {'at least 0' if zero else 'positive'} "
                                             f"and finite, got {text!r}")
        return value
    return parse


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: a free one), got {text!r}")
    return port


def _numel(shape: Sequence[int | None]) -> int:
    n = 1
    for d in shape:
        n *= d or 0
    return n


def _byte_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


#: ``Server`` options the command line sets: (keyword, parser, what it bounds). Their
#: defaults are the ``Server``'s own.
SERVER_OPTIONS: list[tuple[str, Callable[[str], Any], str]] = [
    ("workers", int, "forwards and backwards running at once"),
    ("max_streams", int, "calls open at once (more are refused)"),
    ("max_streams_per_peer", int, "Forward/Vjp calls one connection may hold open"),
    ("min_stream_rate", _byte_size, "bytes/s a request or reply must average past "
                                    "--idle-timeout"),
    ("max_residual_bytes", _byte_size, "bytes all residuals together may hold, e.g. 2GiB"),
    ("max_residuals", int, "residuals held at once"),
    ("residual_ttl", float, "seconds an unused residual lives"),
    ("max_request_bytes", _byte_size, "tensor bytes of one request"),
    ("max_request_values", int, "pytree nodes (tensors, scalars, containers) of one request"),
    ("max_message_bytes", _byte_size, "one gRPC message (None: 4 chunks plus 1 MiB; clients "
                                      "chunk larger tensors)"),
    ("chunk_bytes", _byte_size, "chunks the server streams large replies in"),
    ("max_inflight_bytes", _byte_size, "request bytes all calls together may hold (None: "
                                       "--max-request-bytes)"),
    ("idle_timeout", float, "seconds a request stream may stay silent before it is cancelled"),
    ("shm_arena_bytes", _byte_size, "each shared-memory region of a new same-host session"),
    ("max_shm_arena_bytes", _byte_size, "shared memory of one session, each way"),
    ("max_shm_total_bytes", _byte_size, "shared memory of all sessions together"),
    ("cuda_pool_bytes", _byte_size, "each CUDA IPC pool of a session"),
    ("max_cuda_pool_bytes", _byte_size, "the largest CUDA IPC pool a client may ask for"),
    ("max_cuda_total_bytes", _byte_size, "CUDA IPC pools of all sessions together, per GPU"),
    ("session_lease", float, "seconds a same-host session lives unheard of"),
    ("session_proof_seconds", float, "seconds a client has to prove it shares the host"),
    ("transfer_timeout", float, "seconds a call's UCX transfer may take before the call is "
                                "cancelled"),
    ("max_sessions", int, "same-host sessions held at once"),
    ("max_sessions_per_peer", int, "same-host sessions one connection may hold"),
    ("max_batch", int, "rows one merged run of a batchable endpoint takes (0: never merge "
                       "calls)"),
    ("max_delay", float, "seconds a call to a batchable endpoint waits for others to join it"),
    ("metrics_port", _port, "serve Prometheus metrics over HTTP on this port (0: a free one)"),
]


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


#: Environment variables name flags so: ``--max-batch`` is ``GRADSERVE_MAX_BATCH``.
ENV_PREFIX = "GRADSERVE_"
_TRUE = {"1", "true", "yes", "on"}


def _env_defaults(p: argparse.ArgumentParser) -> None:
    """Let every ``--flag`` of ``p`` take its default from ``$GRADSERVE_FLAG`` (a flag on the
    command line still wins); the help says which variable."""
    for action in p._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or action.dest == "help":
            continue
        name = ENV_PREFIX + flags[0][2:].replace("-", "_").upper()
        action.help = f"{action.help or ''} [${name}]".strip()
        value = os.environ.get(name)
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in _TRUE
        else:
            action.default = value   # argparse passes string defaults through ``type``


def parser() -> argparse.ArgumentParser:
    """The command line's argument parser."""
    from gradserve import __version__
    p = argparse.ArgumentParser(prog="gradserve", description=(
        "Serve PyTorch and JAX models as differentiable functions over gRPC: `gradserve "
        "serve TARGET` hosts them, `gradserve list` shows a server's endpoints, `gradserve "
        "bench` loads one and measures it."))
    p.add_argument("--version", action="version", version=f"gradserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model or function as differentiable endpoints")
    s.add_argument("target", help="module:attr or path/file.py:attr (module, function, "
                                  "Endpoint, dict of those, or a factory)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=_port, default=50051, help="port (default: 50051)")
    s.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: where a "
                   "module's weights are; cpu for a function)")
    s.add_argument("--devices", type=_device_list, default=None,
                   help="host each endpoint once per device, calls going to the least loaded: "
                        "e.g. cuda:0,cuda:1, or cpu,cpu, or 'all' (every GPU torch or JAX "
                        "sees, else the CPU)")
    s.add_argument("--name", default=None, help="endpoint name for a single model (default: attr)")
    defaults = inspect.signature(Server).parameters
    for option, kind, text in SERVER_OPTIONS:
        default = defaults[option].default
        shown = _size(default) if kind is _byte_size and default is not None else default
        s.add_argument("--" + option.replace("_", "-"), type=kind, default=default,
                       help=f"{text} (default: {shown})")
    s.add_argument("--health-port", type=_port, default=None,
                   help="serve the health service alone on this port too, on its own threads "
                        "(for Kubernetes probes; default: the main port only)")
    s.add_argument("--reuse-port", action="store_true",
                   help="share the port with servers already listening there")
    s.add_argument("--grace", type=float, default=5.0,
                   help="seconds a stopping server (SIGTERM, SIGINT) drains: it answers backward "
                        "calls of the residuals it holds and refuses new Forwards (default: "
                        "5; a second signal stops at once)")
    s.add_argument("--debug", action="store_true", help="send tracebacks in error messages")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text or as one JSON object each (default: text)")
    s.add_argument("--verbose", action="store_true",
                   help="log other libraries too, and everything at DEBUG")
    s.add_argument("--otel", action="store_true",
                   help="trace every call with OpenTelemetry (the otel extra; OTLP exporter "
                        "where installed, set by the OTEL_* variables)")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS")
    s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", default=None,
                   help="PEM CA: require client certificates it signed (mutual TLS)")
    s.add_argument("--auth-token-file", default=None,
                   help="accept only calls carrying a token of this file (one per line: "
                        "TOKEN [name=N] [endpoints=a,b|*] [parameters=yes|no] "
                        "[sessions=yes|no]); health checks stay open")
    _env_defaults(s)
    s.set_defaults(run=serve)
    ls = sub.add_parser("list", help="list a server's endpoints and signatures")
    ls.add_argument("address", nargs="?", default="127.0.0.1:50051",
                    help="host:port (default: 127.0.0.1:50051)")
    ls.add_argument("--timeout", type=float, default=10.0)
    _client_flags(ls)
    ls.set_defaults(run=list_endpoints)
    h = sub.add_parser("health", help="exit 0 if a server reports SERVING (grpc.health.v1 "
                                      "Check), 1 otherwise: for container health checks")
    h.add_argument("address", nargs="?", default="127.0.0.1:50051",
                   help="host:port, the main or the health port (default: 127.0.0.1:50051)")
    h.add_argument("--service", default="",
                   help="the service or endpoint to ask about (default: the whole server)")
    h.add_argument("--timeout", type=_positive(float), default=5.0)
    _client_flags(h)
    h.set_defaults(run=check_health)
    b = sub.add_parser("bench", help="measure an endpoint's throughput and latency under load "
                                     "from many concurrent callers")
    b.add_argument("address", help="host:port, or replicas: ipv4:HOST:PORT,HOST:PORT or "
                                   "dns:///NAME:PORT (calls spread over them)")
    b.add_argument("endpoint")
    b.add_argument("--shape", type=_shape, default=None,
                   help="send one argument of this shape, e.g. 16,256 (default: the "
                        "endpoint's declared input specs)")
    b.add_argument("--dtype", type=_dtype, default="float32", help="dtype of --shape's argument")
    b.add_argument("--rows", type=_positive(int), default=16,
                   help="size of a wildcard leading dimension of a declared input")
    b.add_argument("--concurrency", type=_positive_ints, default=[1, 4, 16],
                   help="callers at once, one level each (comma-separated; default 1,4,16)")
    b.add_argument("--processes", type=_positive(int), default=None,
                   help="worker processes the callers are spread over (default: one each)")
    b.add_argument("--duration", type=_positive(float), default=10.0,
                   help="seconds measured per level")
    b.add_argument("--warmup", type=_positive(float, zero=True), default=1.0,
                   help="seconds of calls before each level's measurement, not counted")
    b.add_argument("--transport", choices=("auto", "grpc", "shm", "ucx"), default="auto",
                   help="how tensors move: auto, bytes in the gRPC stream, shared memory "
                        "(same host), UCX (the ucx extra; across hosts)")
    b.add_argument("--backward", action="store_true",
                   help="each call is a Forward and a Vjp (default: a Forward)")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _client_flags(b)
    b.add_argument("--timeout", type=_positive(float), default=30.0,
                   help="seconds one RPC may take")
    b.set_defaults(run=bench)
    return p


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and an access-log
    record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        entry: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "call", None) or {})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(json_lines: bool = False, verbose: bool = False,
                      level: int = logging.INFO) -> None:
    """gradserve's own loggers at ``level`` (a server's INFO: one access-log line per
    call); other libraries' at WARNING unless ``verbose`` (then everything at DEBUG)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("gradserve").setLevel(logging.DEBUG if verbose else level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status."""
    try:
        code = _main(argv)
        sys.stdout.flush()   # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:   # `gradserve list | head -1`: the reader left, nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # so the interpreter's final flush is quiet
        return 0


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    configure_logging(getattr(args, "log_format", "text") == "json",
                      getattr(args, "verbose", False),
                      logging.INFO if args.run is serve else logging.WARNING)
    try:
        return int(args.run(args))
    except BrokenPipeError:   # stdout's reader left: ``main`` ends quietly
        raise
    except Exception as err:  # a clean one-line error for the terminal
        from gradserve.errors import GradserveError
        # a client command's settings (a TLS file that cannot be read, say)
        if isinstance(err, GradserveError) or (args.run is not serve
                                               and isinstance(err, (ValueError, OSError))):
            print(f"gradserve: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
