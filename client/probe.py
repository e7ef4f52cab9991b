"""`digit-probe`: is the server on this machine ready? Exit 0 if so, 1 if not.

Made for container health checks, which run every few seconds for the life of a replica: the
full CLI costs over a CPU-second a run, this costs a few hundredths. It reads the server's own
DIGITS_* settings from the environment it shares with the server (so in the image it needs no
arguments) and asks the HTTP readiness route with the standard library alone; without an HTTP
port it asks gRPC health, which costs grpc's import (~0.1 CPU-s). The check is of this
machine's loopback, so a TLS certificate's name and chain are not verified: readiness, not
identity, is the question.
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import sys

HEALTH_SERVICE = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}, as grpc_health encodes it


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _tls_context(client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context


def http_ready(host: str, port: int, tls: ssl.SSLContext | None, timeout: float) -> str | None:
    """None when GET /v2/health/ready answers 200, else why not."""
    if tls is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection(
            host, port, timeout=timeout
        )
    else:
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
    try:
        connection.request("GET", "/v2/health/ready")
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return f"http {host}:{port}: {exc}"
    finally:
        connection.close()
    return None if status == 200 else f"http {host}:{port}: status {status}"


def grpc_ready(target: str, timeout: float) -> str | None:
    """None when grpc.health.v1 says SERVING for the whole server, else why not."""
    import grpc  # only on this path: it is most of this command's cost

    with grpc.insecure_channel(target) as channel:
        # Raw bytes both ways: protobuf's import would double the cost for a two-byte reply.
        check = channel.unary_unary(HEALTH_SERVICE)
        try:
            reply = check(b"", timeout=timeout)
        except grpc.RpcError as exc:
            return f"grpc {target}: {exc.code().name} {exc.details() or ''}".strip()
    return None if reply == SERVING else f"grpc {target}: not SERVING"


class _Version(argparse.Action):
    """--version, with the package metadata read only when asked (every probe pays imports)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: object, **_kwargs: object) -> None:
        from importlib.metadata import version

        print(f"digit-probe {version('digit-recognizer')}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="digit-probe",
        description="Exit 0 when the digit-server on this machine is ready, 1 when not. "
        "Defaults come from the server's DIGITS_* variables.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument(
        "--http-port",
        type=int,
        default=int(env("DIGITS_HTTP_PORT") or 0) or None,
        help="ask GET /v2/health/ready here (default: $DIGITS_HTTP_PORT)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env("DIGITS_PORT") or 50051),
        help="else ask gRPC health here, plaintext only (default: $DIGITS_PORT or 50051)",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=bool(env("DIGITS_TLS_CERT")) and not _flag("DIGITS_HTTP_PLAINTEXT"),
        help="HTTPS (default: on when $DIGITS_TLS_CERT is set)",
    )
    parser.add_argument("--client-cert", default=None, help="PEM certificate, for mutual TLS")
    parser.add_argument("--client-key", default=None, help="its PEM key")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default: 2)")
    parser.add_argument("--version", nargs=0, action=_Version, help="print the version")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.http_port:
        tls = _tls_context(args.client_cert, args.client_key) if args.tls else None
        problem = http_ready(args.host, args.http_port, tls, args.timeout)
    elif args.tls:
        problem = "gRPC health over TLS is not probed: give --http-port (the HTTP front)"
    else:
        problem = grpc_ready(f"{args.host}:{args.port}", args.timeout)
    if problem:
        print(f"not ready: {problem}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
