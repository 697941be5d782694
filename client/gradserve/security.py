"""TLS settings and call credentials, shared by the server and the client.

``TLSConfig`` names PEM files; grpcio's own credentials do the rest. A client's
bearer token travels in the ``authorization`` metadata of every call, added by a
channel interceptor (so it works on plaintext channels too, where a token is
readable by anyone on the network path: use TLS).
"""

from __future__ import annotations

import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc

#: The environment variable a client takes its token from when ``connect`` is given none.
TOKEN_ENV = "GRADSERVE_TOKEN"
#: The metadata key of a call's bearer token (``authorization: Bearer <token>``).
AUTHORIZATION = "authorization"
#: The metadata key of a client's own random secret: without token auth, the sessions
#: and residuals a client makes are its own by this (another client's calls cannot use them).
CLIENT_KEY = "gradserve-client"


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"TLS {what} {str(path)!r} cannot be read: {err.strerror}") from None


@dataclass(frozen=True)
class TLSConfig:
    """TLS for a server or a client, as PEM file paths.

    A server needs ``cert`` (its certificate chain) and ``key`` (its private key);
    with ``client_ca`` it asks every client for a certificate signed by that CA and
    refuses those without one (mutual TLS). A client verifies the server against
    ``ca`` (None: the system's roots), presents ``cert`` and ``key`` where the
    server wants a client certificate, and checks the server's certificate for
    ``server_name`` when the address it dials is not that name.
    """

    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    client_ca: str | os.PathLike[str] | None = None
    ca: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """The server's credentials; ValueError naming what is missing or unreadable."""
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs both cert and key (PEM files)")
        cert, key = _read(self.cert, "certificate"), _read(self.key, "key")
        assert cert is not None and key is not None
        client_ca = _read(self.client_ca, "client CA")
        # grpc takes bad PEM without a word and then cannot listen: check it here instead
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as err:
            raise ValueError(f"TLS certificate {str(self.cert)!r} and key {str(self.key)!r} "
                             f"are not a PEM certificate chain and its private key: "
                             f"{err.reason or err}") from None
        if client_ca is not None:
            try:
                context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
            except ssl.SSLError as err:
                raise ValueError(f"TLS client CA {str(self.client_ca)!r} is not PEM "
                                 f"certificates: {err.reason or err}") from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A client's credentials; ValueError naming what is missing or unreadable."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS client certificate needs both cert and key (PEM files)")
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca, "CA"),
                                            private_key=_read(self.key, "key"),
                                            certificate_chain=_read(self.cert, "certificate"))

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel options this configuration needs (the name to verify)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


#: What a client reads when ``connect`` is given no ``tls=``: the CA to verify the server
#: with (TLS is on when it is set), the name to verify, and a client certificate and key.
TLS_ENV = {"ca": "GRADSERVE_TLS_CA", "server_name": "GRADSERVE_TLS_SERVER_NAME",
           "cert": "GRADSERVE_TLS_CLIENT_CERT", "key": "GRADSERVE_TLS_CLIENT_KEY"}


def tls_config(tls: bool | TLSConfig | None) -> TLSConfig | None:
    """``connect``'s ``tls=`` as a configuration: True, the system's roots; False, none;
    None, from ``$GRADSERVE_TLS_CA`` (and the other ``TLS_ENV`` variables) if it is set."""
    if tls is None:
        found = {key: os.environ.get(name) or None for key, name in TLS_ENV.items()}
        return TLSConfig(**found) if found["ca"] else None
    if tls is True:
        return TLSConfig()
    return tls or None


def token_from(token: str | None) -> str | None:
    """The client's token: ``token``, else ``$GRADSERVE_TOKEN``, else none."""
    found = token if token is not None else os.environ.get(TOKEN_ENV)
    if found is None:
        return None
    return found.strip() or None


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata to every call of a channel."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = tuple(pairs)

    def _details(self, details: Any) -> Any:
        return _CallDetails(details.method, details.timeout,
                            (*(details.metadata or ()), *self.pairs), details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                               request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any,
                               request_iterator: Iterator[Any]) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any,
                                request_iterator: Iterator[Any]) -> Any:
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any,
                 wait_for_ready: bool | None, compression: Any):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def identified(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """``channel`` sending, with every call, a new random client secret and (where given)
    ``authorization: Bearer <token>``."""
    pairs = [(CLIENT_KEY, secrets.token_hex(16))]
    if token:
        pairs.append((AUTHORIZATION, f"Bearer {token}"))
    return grpc.intercept_channel(channel, _Metadata(pairs))
