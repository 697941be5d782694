"""Exceptions raised by gradserve, on both sides of the wire.

Server code raises :class:`StatusError` with the gRPC status the caller should
see; the client turns every failed RPC into a :class:`RemoteError` subclass
chosen by status code, so callers never handle raw ``grpc.RpcError``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import grpc

T = TypeVar("T")

#: Trailing-metadata key that carries a machine-readable failure reason.
REASON_KEY = "gradserve-reason"
#: Reason sent when a Vjp names a residual the server no longer holds.
RESIDUAL_MISSING = "residual-missing"
#: Reason sent when a call names a shared-memory session the server does not hold.
SESSION_MISSING = "session-missing"
#: Reason sent when a one-message call's reply would not fit one message: send it streaming.
REPLY_TOO_LARGE = "reply-too-large"
#: Reason sent when a server is shutting down: the call should go to another replica.
DRAINING = "draining"
#: Reason sent when a session's regions cannot grow at all any more (its limit is reached).
REGIONS_AT_LIMIT = "regions-at-limit"
#: Reason sent when the server's memory for all sessions is spent for now (it may free up).
BUDGET_SPENT = "budget-spent"
#: Reason sent when an endpoint does not serve a derivative asked for (an order, a mode).
DERIVATIVE_UNSUPPORTED = "derivative-unsupported"
#: Reason sent when a session's UCX link failed: the session's next calls send bytes.
LINK_BROKEN = "link-broken"


class GradserveError(Exception):
    """Base class of every gradserve exception."""


class StatusError(GradserveError):
    """A failure that maps to one gRPC status (raised while handling a call)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def shown(text: str, limit: int = 64) -> str:
    """``repr(text)``, cut to about ``limit`` characters: for echoing what a client sent."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


#: Most bytes a status message may take once percent-encoded in gRPC's trailers (whose
#: limit is 8 KiB: a longer one turns the status into RESOURCE_EXHAUSTED and drops them).
#: The message travels twice (``grpc-message``, and base64 in ``grpc-status-details-bin``).
MAX_STATUS_BYTES = 2500


def clip_status(message: str, limit: int = MAX_STATUS_BYTES) -> str:
    """``message`` cut so that it fits a gRPC status (``limit`` bytes percent-encoded)."""
    size = 0
    for i, char in enumerate(message):
        size += sum(1 if 0x20 <= b < 0x7f and b != 0x25 else 3 for b in char.encode())
        if size > limit - 60:
            return f"{message[:i]}... ({len(message) - i} more characters)"
    return message


def invalid(message: str) -> StatusError:
    """An INVALID_ARGUMENT error: the caller sent something malformed."""
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT, message)


class RemoteError(GradserveError):
    """An RPC to a gradserve server failed; ``code`` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason


class NotFound(RemoteError):
    """No such endpoint."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(RemoteError):
    """The request was malformed or did not fit the endpoint; the message names what."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(RemoteError):
    """Over a size limit of the server."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RemoteError):
    """The server no longer holds what the call names."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResidualMissing(FailedPrecondition):
    """The server no longer holds a residual; the client recomputes."""


class SessionMissing(FailedPrecondition):
    """The server no longer holds the shared-memory session; the client opens a new one."""


class Internal(RemoteError):
    """The model raised, or the server hit a bug; the message says what."""

    code = grpc.StatusCode.INTERNAL


class DeadlineExceeded(RemoteError):
    """The call's ``timeout`` passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(RemoteError):
    """The server cannot be reached (yet)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(RemoteError):
    """The server wants a valid token (``connect(..., token=...)`` or $GRADSERVE_TOKEN)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RemoteError):
    """The token does not allow this call (that endpoint, parameters, sessions)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(RemoteError):
    """The call was cancelled (by the client, or as an idle stream)."""

    code = grpc.StatusCode.CANCELLED


_BY_CODE = {
    cls.code: cls
    for cls in (NotFound, InvalidArgument, ResourceExhausted, FailedPrecondition,
                Internal, DeadlineExceeded, Unavailable, Cancelled, Unauthenticated,
                PermissionDenied)
}


def from_rpc_error(err: grpc.RpcError) -> RemoteError:
    """Translate a grpc error into the matching :class:`RemoteError` subclass."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    entries: Any = trailers or ()   # (key, value) pairs: grpc's named ones, or plain tuples
    found = dict(entries).get(REASON_KEY)
    reason = str(found) if found is not None else None
    if reason == RESIDUAL_MISSING:
        return ResidualMissing(code, message or "", reason)
    if reason == SESSION_MISSING:
        return SessionMissing(code, message or "", reason)
    return _BY_CODE.get(code, RemoteError)(code, message or "", reason)


def from_status(err: StatusError) -> RemoteError:
    """The :class:`RemoteError` a caller sees for a failure this side found itself (a
    transfer over a link that broke or timed out)."""
    return _BY_CODE.get(err.code, RemoteError)(err.code, err.message, err.reason)


def rpc(method: Callable[..., T], request: Any, timeout: float | None) -> T:
    """Call a gRPC method; a failure raises the matching :class:`RemoteError`."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
