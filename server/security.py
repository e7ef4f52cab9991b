"""Transport security and caller authentication.

TLS or mutual TLS come from PEM files; a bearer token (read from a file, never a flag, so it
stays out of `ps` and shell history) is checked before any handler runs, in constant time, by
an interceptor (gRPC) and a middleware (HTTP). What stays open is one table, OPEN_ROUTES, for
both transports: health and readiness probes (load balancers and kubelets carry no
credentials) and the page (a browser cannot send the token with its first request).
Everything else, reflection and server metadata included, needs the token.
"""

from __future__ import annotations

import hmac
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
        return problems

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
