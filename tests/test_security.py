"""TLS, mutual TLS and bearer tokens, with throwaway certificates made for each test run."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from digit_recognizer.client.cli import main as client_cli
from digit_recognizer.client.client import AsyncDigitClient, Credentials
from digit_recognizer.client.errors import Unauthenticated, Unavailable

from onnx_models import one_hot_image


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    token: Path


def _key_and_name(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    return ec.generate_private_key(ec.SECP256R1()), x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_name = _key_and_name("digits test CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(root / "ca", ca_key, ca)

    def leaf(name: str, usage: x509.ObjectIdentifier) -> None:
        key, subject = _key_and_name(name)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if name == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        _write(root / name, key, builder.sign(ca_key, hashes.SHA256()))

    leaf("server", x509.ExtendedKeyUsageOID.SERVER_AUTH)
    leaf("client", x509.ExtendedKeyUsageOID.CLIENT_AUTH)
    (root / "token").write_text("s3cret-token\n")
    return Pki(
        ca=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        client_cert=root / "client.pem",
        client_key=root / "client.key",
        token=root / "token",
    )


async def test_tls_needs_the_ca_and_refuses_plaintext(start_server, tiny_model_path, pki):
    server = await start_server(
        tiny_model_path, plaintext=False, tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    target = f"localhost:{server.port}"
    secure = Credentials(root_certificates=pki.ca.read_bytes())
    async with AsyncDigitClient(target, credentials=secure) as client:
        assert (await client.classify(one_hot_image(4))).digit == 4
    async with AsyncDigitClient(target, timeout=3) as plain:
        with pytest.raises(Unavailable):
            await plain.classify(one_hot_image(4))


async def test_mutual_tls_requires_a_client_certificate(start_server, tiny_model_path, pki):
    server = await start_server(
        tiny_model_path,
        plaintext=False,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )
    target = f"localhost:{server.port}"
    anonymous = Credentials(root_certificates=pki.ca.read_bytes())
    async with AsyncDigitClient(target, credentials=anonymous, timeout=3) as client:
        with pytest.raises(Unavailable):
            await client.classify(one_hot_image(1))
    with_cert = Credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    async with AsyncDigitClient(target, credentials=with_cert) as client:
        assert (await client.classify(one_hot_image(1))).digit == 1


async def test_bearer_token_is_checked_before_any_work(start_server, tiny_model_path, pki):
    server = await start_server(tiny_model_path, auth_token_file=pki.token)
    target = f"127.0.0.1:{server.port}"
    async with AsyncDigitClient(target) as anonymous:
        assert await anonymous.health() == "SERVING"  # probes need no token
        for call in (anonymous.classify(one_hot_image(2)), anonymous.model_info()):
            with pytest.raises(Unauthenticated, match="authorization: Bearer"):
                await call
        with pytest.raises(Unauthenticated):
            _ = [item async for item in anonymous.stream([one_hot_image(2)])]
    async with AsyncDigitClient(target, credentials=Credentials(token="wrong")) as wrong:
        with pytest.raises(Unauthenticated):
            await wrong.classify(one_hot_image(2))
    assert server.plane.queued_images == 0
    async with AsyncDigitClient(target, credentials=Credentials(token="s3cret-token")) as ok:
        assert (await ok.classify(one_hot_image(2))).digit == 2
        assert (await ok.model_info()).name == "tiny"


async def test_every_route_and_method_is_open_or_closed_as_the_one_table_says(
    start_server, tiny_model_path, pki
):
    """security.OPEN_ROUTES, for every HTTP route the app has and every gRPC method served."""
    import aiohttp
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from digit_recognizer.protos import digits_pb2, inference_pb2
    from digit_recognizer.server.http import build_app
    from digit_recognizer.server.security import is_open_grpc, is_open_http

    server = await start_server(tiny_model_path, auth_token_file=pki.token, http_port=0)
    token = {"Authorization": "Bearer s3cret-token"}
    routes = {
        (route.method, route.resource.canonical.format(name="tiny", version="1"))
        for route in build_app(server.plane, 1 << 20, "t").router.routes()
        if route.method != "HEAD"
    }
    assert len(routes) >= 12, routes
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
        for method, path in sorted(routes):
            anonymous = await http.request(method, path)
            if is_open_http(method, path):
                assert anonymous.status == 200, (method, path, anonymous.status)
            else:
                assert anonymous.status == 401, (method, path, anonymous.status)
                assert "Bearer" in (await anonymous.json())["error"]
                signed = await http.request(method, path, headers=token)
                assert signed.status != 401 and signed.status < 500, (method, path, signed.status)

    services = [
        digits_pb2.DESCRIPTOR.services_by_name["DigitClassifier"],
        inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    opened = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for service in services:
            for method in service.methods:
                name = f"/{service.full_name}/{method.name}"
                if method.client_streaming:
                    call = channel.stream_stream(name)(iter([b""]), timeout=5)
                elif method.server_streaming:
                    call = channel.unary_stream(name)(b"", timeout=5)
                else:
                    call = channel.unary_unary(name)(b"", timeout=5)
                try:
                    if method.server_streaming:
                        await call.read()
                    else:
                        await call
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                if method.server_streaming:
                    call.cancel()
                if is_open_grpc(name):
                    opened.append(name)
                    assert code != grpc.StatusCode.UNAUTHENTICATED, name
                else:
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code)
    health = {f"/grpc.health.v1.Health/{m.name}" for m in services[2].methods}
    oip = "/inference.GRPCInferenceService/"
    assert set(opened) == health | {oip + "ServerLive", oip + "ServerReady"}


async def test_token_over_tls_uses_call_credentials(start_server, tiny_model_path, pki):
    server = await start_server(
        tiny_model_path,
        plaintext=False,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        auth_token_file=pki.token,
    )
    credentials = Credentials(root_certificates=pki.ca.read_bytes(), token="s3cret-token")
    async with AsyncDigitClient(f"localhost:{server.port}", credentials=credentials) as client:
        assert (await client.classify(one_hot_image(8))).digit == 8


def test_cli_speaks_tls_and_tokens(processes, tiny_model_path, pki):
    server = processes(
        "--model", str(tiny_model_path), "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), "--auth-token-file", str(pki.token),
    )  # fmt: skip
    port = server.wait_serving()
    args = ["--target", f"localhost:{port}", "--ca-cert", str(pki.ca)]
    ok = CliRunner().invoke(client_cli, ["info", "--json", *args, "--token-file", str(pki.token)])
    assert ok.exit_code == 0, ok.output
    refused = CliRunner().invoke(client_cli, ["info", *args])
    assert refused.exit_code == 1 and "Error: missing or wrong credentials" in refused.stderr


def test_plaintext_must_be_chosen_and_tls_flags_must_be_whole(processes, tiny_model_path, pki):
    import subprocess

    from processes import DIGIT_SERVER

    def start(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [DIGIT_SERVER, "--model", str(tiny_model_path), "--port", "0", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    bare = start()
    assert bare.returncode == 2 and "pass --plaintext (DIGITS_PLAINTEXT=1)" in bare.stderr
    half = start("--tls-cert", str(pki.server_cert))
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    both = start(
        "--plaintext", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)
    )
    assert both.returncode == 2 and "--plaintext contradicts --tls-cert" in both.stderr


def test_permission_denied_is_reported_as_unauthenticated_too():
    """A proxy in front may answer PERMISSION_DENIED; callers get the same error type."""
    from digit_recognizer.client.errors import from_rpc_error

    class Fake(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.PERMISSION_DENIED

        def details(self):
            return "nope"

    assert isinstance(from_rpc_error(Fake(), "x"), Unauthenticated)


def _https(pki: Pki, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


async def test_the_http_front_speaks_tls_with_the_grpc_files(start_server, tiny_model_path, pki):
    """TLS on gRPC means TLS on the HTTP port too: a bearer token never crosses it in clear."""
    import aiohttp

    server = await start_server(
        tiny_model_path,
        plaintext=False,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        auth_token_file=pki.token,
        http_port=0,
    )
    assert server.http.tls
    token = {"Authorization": "Bearer s3cret-token"}
    async with aiohttp.ClientSession() as http:
        base = f"https://localhost:{server.http.port}"
        ready = await http.get(f"{base}/v2/health/ready", ssl=_https(pki))
        assert ready.status == 200
        meta = await http.get(f"{base}/v2/models/tiny", ssl=_https(pki), headers=token)
        assert meta.status == 200 and (await meta.json())["name"] == "tiny"
        assert (await http.get(f"{base}/v2/models/tiny", ssl=_https(pki))).status == 401
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
            await http.get(f"http://localhost:{server.http.port}/v2/health/ready")


async def test_mutual_tls_on_the_http_front_needs_a_client_certificate(
    start_server, tiny_model_path, pki
):
    import aiohttp

    server = await start_server(
        tiny_model_path,
        plaintext=False,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        http_port=0,
    )
    url = f"https://localhost:{server.http.port}/v2/health/ready"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):  # the handshake is refused, probes included
            await (await http.get(url, ssl=_https(pki))).read()
        assert (await http.get(url, ssl=_https(pki, client_cert=True))).status == 200


async def test_http_plaintext_serves_plain_http_beside_tls_grpc(start_server, tiny_model_path, pki):
    import aiohttp

    server = await start_server(
        tiny_model_path,
        plaintext=False,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        http_port=0,
        http_plaintext=True,
    )
    assert not server.http.tls
    async with aiohttp.ClientSession() as http:
        reply = await http.get(f"http://127.0.0.1:{server.http.port}/v2/health/ready")
        assert reply.status == 200
    secure = Credentials(root_certificates=pki.ca.read_bytes())
    async with AsyncDigitClient(f"localhost:{server.port}", credentials=secure) as client:
        assert (await client.classify(one_hot_image(9))).digit == 9  # gRPC keeps its TLS


@pytest.mark.parametrize("plain", [False, True])
def test_the_start_says_how_the_http_port_is_served(processes, tiny_model_path, pki, plain):
    server = processes(
        "--model", str(tiny_model_path), "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), "--http-port", "0",
        *(["--http-plaintext"] if plain else []),
    )  # fmt: skip
    server.wait_serving()
    server.proc.send_signal(signal.SIGTERM)
    code, log = server.finish()
    assert code == 0, log
    port = server.http_port()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    if plain:
        assert f"page url=http://127.0.0.1:{port}/" in log and " http_tls=off " in log
        (warning,) = warnings
        assert "--http-plaintext" in warning and "in clear" in warning
    else:
        assert f"page url=https://127.0.0.1:{port}/" in log and " http_tls=on " in log
        assert not warnings, warnings


def test_unusable_pem_files_are_a_flag_problem(processes, tiny_model_path, tmp_path, pki):
    """Refused with the other flags (exit 2), before anything loads: grpc read them only at
    bind time, after the model had loaded, and Python's ssl would say it in a traceback."""
    import subprocess

    from processes import DIGIT_SERVER

    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    result = subprocess.run(
        [DIGIT_SERVER, "--model", str(tiny_model_path), "--tls-cert", str(broken),
         "--tls-key", str(pki.server_key), "--max-batch-size", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--tls-cert/--tls-key/--tls-client-ca: not a usable PEM" in result.stderr
    assert "--max-batch-size must be at least 1" in result.stderr


@pytest.mark.parametrize("cli", ["digit_recognizer.server.cli", "digit_recognizer.client.cli"])
def test_grpc_core_stays_quiet_unless_asked(cli):
    """gRPC core prints unformatted lines of its own (`I1207 ... ssl_transport_security.cc
    Handshake failed` for every plaintext caller on a TLS port), breaking --log-format json
    and coming before the CLI's one-line errors; GRPC_VERBOSITY set by the user still wins."""
    import os
    import subprocess
    import sys

    show = f"import os, {cli}; print(os.environ['GRPC_VERBOSITY'])"
    clean = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    for env, expected in ((clean, "ERROR"), ({**clean, "GRPC_VERBOSITY": "INFO"}, "INFO")):
        done = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                              env=env, timeout=60)  # fmt: skip
        assert done.stdout.strip() == expected, done.stderr
