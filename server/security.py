"""Transport security and caller authentication.

TLS or mutual TLS come from PEM files, the same ones for every port that carries calls: gRPC
and the HTTP front (plain HTTP beside TLS gRPC only with --http-plaintext). A bearer token
(read from a file, never a flag, so it stays out of `ps` and shell history) is checked before
any handler runs, in constant time, by an interceptor (gRPC) and a middleware (HTTP). What
stays open is one table, OPEN_ROUTES, for both transports: health and readiness probes (load
balancers and kubelets carry no credentials) and the page (a browser cannot send the token
with its first request). Everything else, reflection and server metadata included, needs the
token.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from digit_recognizer.server import metrics


@dataclass(frozen=True)
class OpenRoute:
    """One thing anyone may call without the token, as each transport spells it."""

    purpose: str
    grpc_prefix: str | None  # a full method name, or a service's prefix ending in "/"
    http: tuple[str, str] | None  # (method, path)


OPEN_ROUTES = (
    OpenRoute("health checks", "/grpc.health.v1.Health/", None),
    OpenRoute("liveness", "/inference.GRPCInferenceService/ServerLive", ("GET", "/v2/health/live")),
    OpenRoute(
        "readiness", "/inference.GRPCInferenceService/ServerReady", ("GET", "/v2/health/ready")
    ),
    OpenRoute("the draw-a-digit page", None, ("GET", "/")),
    OpenRoute("its icon", None, ("GET", "/favicon.ico")),
)
_OPEN_GRPC = tuple(route.grpc_prefix for route in OPEN_ROUTES if route.grpc_prefix)
_OPEN_HTTP = frozenset(route.http for route in OPEN_ROUTES if route.http)


def is_open_grpc(method: str) -> bool:
    return method.startswith(_OPEN_GRPC)


def is_open_http(method: str, path: str) -> bool:
    return ("GET" if method == "HEAD" else method, path) in _OPEN_HTTP


UNAUTHENTICATED_MESSAGE = (
    "missing or wrong credentials: send the metadata 'authorization: Bearer <token>'"
)


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed
    auth_token_file: Path | None = None
    plaintext: bool = False
    http_plaintext: bool = False  # the HTTP front without TLS although gRPC has it

    @property
    def tls(self) -> str:
        """How gRPC is served, as the start-up line says it: mutual, on or off."""
        return "mutual" if self.tls_client_ca else "on" if self.tls_cert else "off"

    @property
    def http_tls(self) -> str:
        return "off" if self.http_plaintext else self.tls

    def validate(self) -> list[str]:
        problems = []
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.plaintext and self.tls_cert is not None:
            problems.append("--plaintext contradicts --tls-cert; choose one")
        if not self.plaintext and self.tls_cert is None and self.tls_key is None:
            problems.append(
                "no --tls-cert/--tls-key given: pass --plaintext (DIGITS_PLAINTEXT=1) to serve "
                "without TLS on purpose"
            )
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--auth-token-file", self.auth_token_file),
        ):
            if path is not None and not path.is_file():
                problems.append(f"{flag} {path}: no such file")
        token = self.auth_token_file
        if token is not None and token.is_file() and not token.read_text().strip():
            problems.append(f"--auth-token-file {token}: the file is empty")
        if not problems and self.tls_cert is not None:
            # grpc reads the PEM files only when it binds, after the model has loaded; Python's
            # ssl says now, in one line, what is wrong with them.
            try:
                self._ssl_context()
            except (ssl.SSLError, ValueError) as exc:
                problems.append(f"--tls-cert/--tls-key/--tls-client-ca: {_ssl_reason(exc)}")
        return problems

    def ssl_context(self) -> ssl.SSLContext | None:
        """For the HTTP front: the gRPC port's certificate, key and client CA; None without
        TLS. TLS 1.2 at least, Python's default ciphers."""
        if self.tls_cert is None or self.tls_key is None or self.http_plaintext:
            return None
        return self._ssl_context()

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.tls_cert is not None and self.tls_key is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_client_ca is not None:
            context.load_verify_locations(cafile=self.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no handshake
        # HTTP/1.1 only: aiohttp speaks nothing else, and saying so spares clients a retry.
        context.set_alpn_protocols(["http/1.1"])
        return context

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        client_ca = self.tls_client_ca.read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(self.tls_key.read_bytes(), self.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def token(self) -> str | None:
        return self.auth_token_file.read_text().strip() if self.auth_token_file else None

    def interceptors(self, token: str | None) -> list[grpc.aio.ServerInterceptor]:
        return [BearerTokenInterceptor(token)] if token else []


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return f"not a usable PEM certificate, key or CA ({reason})"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        if is_open_grpc(method) or self._authorised(details):
            return handler
        if handler is None:  # an unknown method: without the token, nothing is told
            return grpc.unary_unary_rpc_method_handler(_deny)
        metrics.REQUESTS.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED", "", "").inc()
        return _refusing(handler)

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(presented, self._expected)
        return False


async def _deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same kind of handler (so streams stay streams), aborting before any work."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return handler._replace(**{kind: _deny})  # type: ignore[attr-defined]
    return handler
