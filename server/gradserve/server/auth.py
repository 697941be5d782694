"""Token auth: who may call, and what each token allows.

A token file holds one token per line, then optional ``key=value`` fields::

    # token                          fields (defaults: every endpoint, parameters, sessions)
    3f9c0a...e1                      name=trainer
    77b2d4...0c                      name=viewer endpoints=digits parameters=no sessions=no

``name`` labels the caller (default ``token-<line>``); ``endpoints`` is a
comma-separated list of the endpoints it may call (``*``: all); ``parameters``
and ``sessions`` say whether it may read endpoints' parameters
(``GetParameters``) and open same-host sessions (shared memory, CUDA IPC).
Every call but the health service's carries ``authorization: Bearer <token>``:
none, or one not in the file, is UNAUTHENTICATED (checked by
``AuthInterceptor`` before any handler runs); a token used beyond its scopes is
PERMISSION_DENIED (checked by the handlers through ``Tokens.require``).
Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc

from gradserve.errors import StatusError, shown
from gradserve.server.metrics import Observer
from gradserve.security import AUTHORIZATION

#: Methods that need no token: health checks (load balancers, kubelets).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_YES = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


@dataclass(frozen=True)
class Token:
    """One accepted token and what it allows."""

    secret: str = field(repr=False)
    name: str
    endpoints: frozenset[str] | None = None   # None: every endpoint
    parameters: bool = True
    sessions: bool = True

    def may_call(self, endpoint: str) -> bool:
        """Whether this token may call ``endpoint``."""
        return self.endpoints is None or endpoint in self.endpoints


class Tokens:
    """The tokens a server accepts."""

    def __init__(self, tokens: Iterable[Token]):
        self.tokens = list(tokens)
        if not self.tokens:
            raise ValueError("token auth needs at least one token")
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("token names must differ (they say whose calls are whose)")
        if len({t.secret for t in self.tokens}) != len(self.tokens):
            raise ValueError("a token is listed twice (its scopes would be ambiguous)")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Tokens":
        """Read a token file; ValueError naming the line that is wrong."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ValueError(f"token file {str(path)!r} cannot be read: {err.strerror}") from None
        tokens = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split()
            cut = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))
            if cut:   # a comment starts a word ('#' inside a token is part of it)
                tokens.append(_parse(words[:cut], f"{path}:{number}", number))
        return cls(tokens)

    def find(self, metadata: Iterable[tuple[str, Any]] | None) -> Token | None:
        """The token a call's metadata carries, if it is one of these."""
        header = next((str(v) for k, v in metadata or () if k == AUTHORIZATION), "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return None
        found = None
        offered = secret.strip().encode()
        for token in self.tokens:   # every one compared: the time does not tell which matched
            if hmac.compare_digest(token.secret.encode(), offered):
                found = token
        return found

    @staticmethod
    def require(token: Token | None, *, endpoint: str | None = None, parameters: bool = False,
                sessions: bool = False) -> Token:
        """The call's token (``find`` found it); PERMISSION_DENIED unless it allows what the
        call does."""
        if token is None:   # the interceptor lets none through; a handler called otherwise
            raise StatusError(grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")
        if endpoint is not None and not token.may_call(endpoint):
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED,
                              f"token {token.name!r} may not call endpoint {shown(endpoint)}")
        if parameters and not token.parameters:
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED,
                              f"token {token.name!r} may not read endpoint parameters")
        if sessions and not token.sessions:
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED,
                              f"token {token.name!r} may not open same-host sessions")
        return token


def _parse(words: list[str], where: str, number: int) -> Token:
    secret = words[0]
    fields: dict[str, str | None] = dict.fromkeys(("name", "endpoints", "parameters",
                                                    "sessions"))
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{where}: expected name=, endpoints=, parameters= or sessions=, "
                             f"got {word!r}")
        fields[key] = value
    if len(secret) < 16:
        raise ValueError(f"{where}: a token must have at least 16 characters")
    flags = {}
    for key in ("parameters", "sessions"):
        flag = fields[key]
        if flag is not None and flag.lower() not in _YES:
            raise ValueError(f"{where}: {key}= takes yes or no, got {flag!r}")
        flags[key] = True if flag is None else _YES[flag.lower()]
    listed = fields["endpoints"]
    endpoints = (None if listed in (None, "*") else
                 frozenset(e for e in (listed or "").split(",") if e))
    return Token(secret, fields["name"] or f"token-{number}", endpoints, flags["parameters"],
                 flags["sessions"])


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a known token (UNAUTHENTICATED), health checks aside;
    ``observer`` counts and logs the refused calls like any other."""

    def __init__(self, tokens: Tokens, observer: Observer | None = None):
        self.tokens = tokens
        self.observer = observer

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        if details.method.startswith(OPEN_PREFIXES) or self.tokens.find(
                details.invocation_metadata) is not None:
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        return _refusal(handler, details.method.rpartition("/")[2], self.observer)


def _refusal(handler: Any, method: str, observer: Observer | None) -> Any:
    """A handler of ``handler``'s kind that ends the call (of ``method``) UNAUTHENTICATED."""
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        if observer is not None:
            with observer.call(method, context.peer()) as call:
                call.code = "UNAUTHENTICATED"
                call.extra["error"] = "no valid token"
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "a valid token is required: send 'authorization: Bearer <token>' "
                      "(gradserve.connect(..., token=...) or $GRADSERVE_TOKEN)")

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attribute, make in kinds:
        if getattr(handler, attribute) is not None:
            return make(refuse, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return None
