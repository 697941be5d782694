"""A fault-injecting channel: wraps a real one, counts calls per method, fails chosen calls.

``gradserve.connect(address, channel=FaultChannel(grpc.insecure_channel(address)))``
lets a test see how often the client called each RPC and make the next
``Forward`` (say) fail with a chosen status, to exercise recovery paths.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

import grpc


class InjectedError(grpc.RpcError, grpc.Call, grpc.Future):
    """What a failed call raises, like grpc's own errors (which are finished futures too:
    channel interceptors ask them for their ``result``)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple = ()):
        super().__init__(details)
        self._code, self._details = code, details
        self._trailers = tuple(trailers)   # plain (key, value) pairs

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailers

    def initial_metadata(self) -> tuple:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> "InjectedError":
        return self

    def traceback(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn: Any) -> None:
        fn(self)

    def done(self) -> bool:
        return True

    def running(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False


class FaultChannel(grpc.Channel):
    """Counts calls by method name (``calls["Forward"]``) and fails those queued by ``fail``.

    A call's one-message and streaming RPCs are one call here (``ForwardUnary`` counts
    and fails as ``Forward``); ``rpcs`` counts the RPCs by their own names.
    """

    def __init__(self, inner: grpc.Channel):
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()
        self.rpcs: collections.Counter[str] = collections.Counter()
        self._failures: dict[str, collections.deque[InjectedError]] = collections.defaultdict(
            collections.deque)

    def fail(self, method: str, code: grpc.StatusCode, details: str = "injected fault",
             times: int = 1, trailers: tuple = ()) -> None:
        """Make the next ``times`` calls of ``method`` fail with ``code``."""
        for _ in range(times):
            self._failures[method].append(InjectedError(code, details, trailers))

    def _next_failure(self, method: str) -> InjectedError | None:
        name = method.rsplit("/", 1)[-1]
        self.rpcs[name] += 1
        name = name.removesuffix("Unary")
        self.calls[name] += 1
        queue = self._failures.get(name)
        return queue.popleft() if queue else None

    def _wrap(self, kind: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, method, getattr(self.inner, kind)(method, *args, **kwargs),
                       kind in ("unary_stream", "stream_stream"))

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap("unary_unary", method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap("unary_stream", method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap("stream_unary", method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap("stream_stream", method, *args, **kwargs)

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self.inner.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self.inner.unsubscribe(callback)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "FaultChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Method:
    """One method of a ``FaultChannel``: the real one, unless a failure is queued. It
    answers ``with_call`` too, as channel interceptors call unary methods so."""

    def __init__(self, channel: FaultChannel, method: str, real: Any, streams_out: bool):
        self.channel, self.method, self.real, self.streams_out = channel, method, real, streams_out

    def __call__(self, request: Any, *a: Any, **k: Any) -> Any:
        failure = self.channel._next_failure(self.method)
        if failure is None:
            return self.real(request, *a, **k)
        if self.streams_out:
            return _raising(failure)
        raise failure

    def with_call(self, request: Any, *a: Any, **k: Any) -> Any:
        failure = self.channel._next_failure(self.method)
        if failure is None:
            return self.real.with_call(request, *a, **k)
        raise failure


def _raising(error: InjectedError) -> Iterator[Any]:
    raise error
    yield  # noqa: unreachable (makes this a generator)


def fault_client(address: str, **options: Any) -> tuple[Any, FaultChannel]:
    """A connected client whose calls go through a new ``FaultChannel``."""
    import gradserve
    channel = FaultChannel(grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]))
    return gradserve.connect(address, channel=channel, **options), channel
