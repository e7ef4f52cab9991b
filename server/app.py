"""Wiring: repository -> data plane -> fronts (digits.v1, OIP gRPC, HTTP), health, reflection,
metrics, signals; `run` starts one server or the supervisor of several.

Start-up refuses in one line ("not starting: ...", exit 1), cheapest checks first: the ports
are bound before any model is loaded (`reserve_port`), and with --workers N the models are
loaded once in this process before any worker exists (`probe`)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from digit_recognizer.server import logs, metrics, tracing
from digit_recognizer.server.config import ServerConfig
from digit_recognizer.server.dataplane import DataPlane
from digit_recognizer.server.errors import ModelError, StartupError
from digit_recognizer.server.http import HttpFront, HttpLimits, build_app
from digit_recognizer.server.inference import InferenceOptions, Model
from digit_recognizer.server.oip import SERVICE_NAME as OIP_SERVICE_NAME
from digit_recognizer.server.oip import InferenceService
from digit_recognizer.server.repository import ModelRepository
from digit_recognizer.server.service import SERVICE_NAME, DigitClassifierService
from digit_recognizer.server.supervisor import (
    WorkerLink,
    release_signals,
    reserve_port,
    supervise,
)
from digit_recognizer.server.tracing import Tracing

log = logging.getLogger("digit_recognizer.server")
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
STOP_GRACE_S = 1.0
# Calls and streams at once on one HTTP/2 connection, by default (--max-streams-per-connection).
MAX_STREAMS_PER_CONNECTION = ServerConfig.max_streams_per_connection
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    plane: DataPlane
    repository: ModelRepository
    http: HttpFront | None = None

    async def stop(self, grace_s: float, drain_delay_s: float = 0.0) -> int:
        """SIGTERM's sequence; returns how many calls the grace period cut off.

        1. Health NOT_SERVING and readiness false at once: probes and clients with
           client-side health checking (DigitClient) stop sending within milliseconds.
        2. `drain_delay_s` of normal service: endpoint removal takes seconds to reach
           clients (Kubernetes).
        3. Serve every call that arrives until none has arrived for a quiet window and none
           is in progress, or until `grace_s` ends. Nothing is refused for draining.
        4. `server.stop()`: the listener closes and GOAWAY moves every other client. It is
           last because grpc core CANCELs calls that arrived but that the application has not
           picked up yet the moment stop() is called, whatever the grace (grpc/grpc#41785;
           scripts/grpc_shutdown_experiment.py): stopping only when traffic has ceased is
           what keeps that set empty.
        """
        await self.repository.stop()
        await self.health.enter_graceful_shutdown()
        self.plane.start_draining()
        await asyncio.sleep(drain_delay_s)
        unfinished = await self.plane.drain(grace_s)
        if unfinished:
            log.warning("grace period over: ending %d calls still in progress", unfinished)
        # Calls that raced the stop, and long-lived ones (health Watch, idle streams), get a
        # moment, then are closed.
        await self.server.stop(STOP_GRACE_S)
        if self.http is not None:
            await self.http.stop()
        await self.plane.close()
        self.plane.tracing.shutdown()  # what is still batched goes out now
        return unfinished


async def start_server(
    config: ServerConfig, model: Model | None = None, *, reuse_port: bool = False
) -> RunningServer:
    """Load the repository (`model`: an already-loaded --model FILE), bind, then SERVING."""
    plane = DataPlane(config.request_limits, config.batcher_limits)
    plane.tracing = Tracing.from_environment()
    try:
        return await _start(config, plane, model, reuse_port)
    except Exception:  # what was loaded is let go, whatever stopped the start
        await plane.close()
        raise


async def _start(
    config: ServerConfig, plane: DataPlane, model: Model | None, reuse_port: bool
) -> RunningServer:
    repository = _repository(config, plane)
    await repository.load(model)
    _choose_default(config, plane)
    security = config.security
    token = security.token()  # read once: the gRPC interceptor and the HTTP front share it
    server = grpc.aio.server(
        interceptors=security.interceptors(token),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Unlimited by default, and grpc core then CANCELs streams opened in a burst
            # (of 10,000 idle ClassifyStreams on 10 connections, ~5,500 within 3 s; the bare
            # floor server too). With a limit, clients queue the extra streams instead. Low,
            # for fairness: what one connection has in progress is work ahead of every other
            # connection's calls on this event loop (config.py has the figures). Streams still
            # allocated count too (grpc.http.overload_protection, against rapid resets), so
            # a client that opens more than this at once sees some refused (UNAVAILABLE).
            ("grpc.max_concurrent_streams", config.max_streams_per_connection),
            # grpc core CANCELs calls past 1,000 waiting for the application across all
            # connections: with the per-connection limit, connections enough would see some.
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 200_000),
            *_connection_age_options(config),
        ],
    )
    DigitClassifierService(plane, worker=config.instance, workers=config.instances).add_to(server)
    InferenceService(plane, workers=config.instances).add_to(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, OIP_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = security.server_credentials()
    try:
        port = (
            server.add_secure_port(config.address, credentials)
            if credentials
            else server.add_insecure_port(config.address)
        )
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {config.address} ({exc})") from None
    http = None
    if config.http_port is not None:  # bound before anything reports SERVING
        http = HttpFront(
            build_app(plane, config.max_message_bytes, token, workers=config.instances),
            config.host,
            config.http_port,
            reuse_port=reuse_port,
            limits=HttpLimits(config.http_header_timeout_s, config.http_max_connections),
            ssl_context=security.ssl_context(),  # the gRPC port's TLS, unless --http-plaintext
        )
        try:
            await http.start()
        except OSError as exc:
            raise StartupError(f"cannot serve HTTP on port {config.http_port} ({exc})") from None
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    repository.start()
    return RunningServer(server, port, health_servicer, plane, repository, http)


def _connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """SO_REUSEPORT spreads connections over --workers' processes when they open, blind to
    load, and a long-lived client never opens another: its connection is closed (GOAWAY) after
    an age, so it lands again, at random, and lopsided spreads do not last. Calls in progress
    finish within the grace; the client's next calls go to its new connection, none fail."""
    if not config.max_connection_age_s:
        return []
    return [
        ("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)),
    ]


def _repository(
    config: ServerConfig, plane: DataPlane, options: InferenceOptions | None = None
) -> ModelRepository:
    return ModelRepository(
        plane,
        config.model_repository or config.model,
        is_directory=config.model_repository is not None,
        policy=config.policy,
        options=options or config.inference,
        batcher_limits=config.batcher_limits,
        interval_s=config.reload_interval_s,
        control_mode=config.model_control_mode,
        load_models=config.load_model,
        honour_instance_kind=options is None,  # the probe stays on its CPU options
        limits=config.repository_limits,
    )


def _choose_default(config: ServerConfig, plane: DataPlane) -> None:
    names = sorted({served.name for served in plane.served()})
    plane.default_model = config.default_model or names[0]
    if plane.default_model not in names:
        raise StartupError(
            f"--default-model {config.default_model!r} is not served; the repository serves "
            + ", ".join(names)
        )


def probe(config: ServerConfig) -> None:
    """What every worker's start would refuse (a corrupt model, no servable version, an
    unserved --default-model), refused once, here, before any worker exists. On the CPU with
    one thread, whatever --provider says: this process serves no calls, and a CUDA context
    would hold GPU memory in it for nothing (the workers still check CUDA themselves)."""
    asyncio.run(_probe(config))


async def _probe(config: ServerConfig) -> None:
    plane = DataPlane(config.request_limits, config.batcher_limits)
    options = replace(config.inference, provider="cpu", intra_op_threads=1)
    try:
        with logs.silenced("digit_recognizer.server"):  # the first worker says what it loads
            await _repository(config, plane, options).load()
        _choose_default(config, plane)
    finally:
        await plane.close()


async def serve(config: ServerConfig, *, worker: WorkerLink | None = None) -> int:
    """Run one server until SIGTERM/SIGINT, then drain. Returns the exit code.

    `worker`: one of --workers N, sharing the ports (SO_REUSEPORT); it tells the supervisor
    when it serves or why it cannot, and the supervisor prints those lines once for all."""
    stopping = asyncio.Event()  # before anything else: a signal during start-up means stop
    loop = asyncio.get_running_loop()
    # A worker keeps SIGINT held for good (its supervisor decides when it stops; a terminal's
    # Ctrl-C reaches every process of the group).
    signals = frozenset({signal.SIGTERM} if worker else {signal.SIGTERM, signal.SIGINT})
    for signum in signals:
        loop.add_signal_handler(signum, stopping.set)
    release_signals(signals)  # held since the process started (cli.py): taken from now on
    if worker is not None:
        worker.on_supervisor_exit(loop, stopping.set)
    try:
        running = await start_server(config, reuse_port=worker is not None)
    except (ModelError, StartupError) as exc:
        _not_starting(exc, worker)
        return 1
    if config.metrics_port is not None:  # None for --workers' processes: the supervisor serves
        try:  # only now: a server that cannot start logs one line, not a metrics line first
            start_metrics(config)
        except StartupError as exc:
            _not_starting(exc, worker)
            await running.stop(0)
            return 1
    plane = running.plane
    fields = _serving_fields(config, running)
    url = _page_url(config, running.http)
    # What start-up made (modules, models, descriptors: ~50,000 objects) lives as long as the
    # process: frozen (its garbage collected first), the collector's full passes skip it.
    # Those came every few seconds under a flood of HTTP connections, 30-110 ms each on the
    # event loop, and take about half that frozen.
    gc.collect()
    gc.freeze()
    logs.started()
    if worker is None:
        log.info("serving", extra={"fields": fields})
        if url:
            log.info("page", extra={"fields": {"url": url}})
    else:
        log.debug("serving", extra={"fields": fields})
        worker.serving(fields, url)
    await stopping.wait()
    log.info(
        "draining",
        extra={
            "fields": {
                "grace_s": config.grace_s,
                "drain_delay_s": config.drain_delay_s,
                "accepted_requests": plane.active_requests,
                "queued_images": plane.queued_images,
            }
        },
    )
    ended = await running.stop(config.grace_s, config.drain_delay_s)
    log.info("stopped", extra={"fields": {"ended_calls": ended}})
    return 0


def _not_starting(exc: Exception, worker: WorkerLink | None) -> None:
    if worker is None:
        log.error("not starting: %s", exc)
    else:  # every worker would say the same: the supervisor says it once
        log.debug("not starting: %s", exc)
        worker.failed(str(exc))


def _serving_fields(config: ServerConfig, running: RunningServer) -> dict[str, object]:
    plane = running.plane
    default = plane.resolve()
    security = config.security
    return {
        "model": str(config.model_repository or config.model),
        "models": " ".join(f"{s.name}:{s.version}" for s in plane.served()),
        "default_model": plane.default_model,
        "name": default.name,
        "version": default.version,
        "sha256": default.model.file_sha256,
        "provider": default.model.provider,
        "max_batch_size": config.max_batch_size,
        "max_delay_us": config.max_delay_us,
        "max_queue_size": config.max_queue_size,
        "max_images_per_request": config.max_images_per_request,
        "address": f"{config.host}:{running.port}",
        "http_port": running.http.port if running.http else "off",
        **({"http_tls": security.http_tls} if running.http else {}),
        "tls": security.tls,
        "auth": "bearer token" if config.auth_token_file else "none",
        "pid": os.getpid(),
    }


def _page_url(config: ServerConfig, http: HttpFront | None) -> str | None:
    if http is None:
        return None
    host = config.host.strip("[]")
    shown = "localhost" if host in ("", "::", "0.0.0.0") else host
    scheme = "https" if http.tls else "http"
    return f"{scheme}://{f'[{shown}]' if ':' in shown else shown}:{http.port}/"


def run(config: ServerConfig) -> int:
    """The process entry point: one server, or a supervisor of `config.workers` servers."""
    _give_back_large_allocations()
    for problem in tracing.configuration_problems():  # once, not once per worker
        log.warning("tracing: %s", problem)
    security = config.security
    if config.http_port is not None and security.http_tls != security.tls:
        log.warning(
            "--http-plaintext: the HTTP port serves plain HTTP while gRPC has TLS; bearer "
            "tokens and pictures cross it in clear"
        )
    try:
        if config.workers > 1:
            return supervise(config, worker_main, start_metrics, probe)
        _check_ports(config)
    except (ModelError, StartupError) as exc:
        log.error("not starting: %s", exc)
        return 1
    return asyncio.run(serve(config))


def _check_ports(config: ServerConfig) -> None:
    """Each port the server will bind, bound and let go at once: a busy one is one line
    before the model loads (and before grpc core prints its own line about it)."""
    for purpose, host, port in (
        ("listen on", config.host, config.port),
        ("serve HTTP on", config.host, config.http_port),
        ("serve metrics on", config.metrics_host or "0.0.0.0", config.metrics_port),
    ):
        if port:  # None: not served; 0: any free port, never busy
            with reserve_port(host, port, purpose, shared=False):
                pass


def start_metrics(config: ServerConfig) -> None:
    try:
        server = metrics.serve_metrics(config.metrics_port or 0, config.metrics_host)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise StartupError(
            f"cannot serve metrics on port {config.metrics_port} ({reason})"
        ) from None
    log.info(
        "metrics",
        extra={
            "fields": {
                "address": f"{config.metrics_host or '0.0.0.0'}:{server.server_port}",
                "path": "/metrics",
            }
        },
    )


def _give_back_large_allocations() -> None:
    """glibc serves large blocks from mmap, but raises that threshold to the size of any such
    block freed: after one big picture upload, decoded pictures come from the heap and their
    memory stays with the process. A fixed threshold keeps returning it (Linux, glibc only).
    Fixing it also fixes the heap's trim threshold at 128 KB, which made every bulk request
    fault its buffers in again (-10% images/s measured): that one is set high instead."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def worker_main(config: ServerConfig, link: WorkerLink) -> None:
    """One of --workers N: a whole server in a spawned process."""
    # The supervisor's SIGTERM may come while this one still starts: held until serve() has
    # its handler. (Before this line, during the imports, it simply ends the process.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    _give_back_large_allocations()
    # The first worker says what every worker would while starting; the others only errors.
    logs.configure_logging(config.log_level, config.log_format, quiet_start=link.index > 0)
    sys.exit(asyncio.run(serve(config, worker=link)))
