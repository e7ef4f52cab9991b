"""Wiring: model + batcher + servicers + health + reflection + metrics + signals + workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from digit_recognizer.protos import inference_pb2_grpc
from digit_recognizer.server import metrics
from digit_recognizer.server.batcher import Batcher, BatchEvent
from digit_recognizer.server.config import ServerConfig
from digit_recognizer.server.errors import ModelError
from digit_recognizer.server.http import HttpFront, build_app
from digit_recognizer.server.inference import Model, load_model
from digit_recognizer.server.oip import SERVICE_NAME as OIP_SERVICE_NAME
from digit_recognizer.server.oip import InferenceService
from digit_recognizer.server.reload import ModelReloader
from digit_recognizer.server.service import (
    SERVICE_NAME,
    DigitClassifierService,
    ServiceLimits,
    add_to_server,
)

log = logging.getLogger("digit_recognizer.server")
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class StartupError(Exception):
    """The server cannot start (bad model, port taken); one line for the operator."""


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service: DigitClassifierService
    batcher: Batcher
    reloader: ModelReloader | None
    http: HttpFront | None = None

    @property
    def model(self) -> Model:
        return self.service.model

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING, refuse new calls, finish accepted ones within the grace period."""
        if self.reloader is not None:
            await self.reloader.stop()
        await self.health.enter_graceful_shutdown()
        drained = await self.service.drain(grace_s)
        if not drained:
            log.warning(
                "grace period over with %d requests unfinished", self.service.active_requests
            )
        # Long-lived calls (health Watch, idle streams) get a moment, then are closed.
        await self.server.stop(min(grace_s, 1.0))
        if self.http is not None:
            await self.http.stop()
        await self.batcher.close()


async def start_server(
    config: ServerConfig, model: Model, *, reuse_port: bool = False
) -> RunningServer:
    def record_batch(event: BatchEvent) -> None:
        metrics.BATCH_SIZE.observe(event.size)
        metrics.BATCH_COMPUTE.observe(event.compute_us / 1e6)
        metrics.QUEUE_DEPTH.set(batcher.queued_images)  # sampled at every model run
        if event.failed:
            metrics.FAILED_BATCHES.inc()

    batcher = Batcher(
        model.predict,
        config.batcher_limits,
        on_batch=record_batch,
        on_skip=lambda reason: metrics.SKIPPED.labels(reason).inc(),
        version=model.card.version,
    )
    security = config.security
    token = security.token()  # read once: the gRPC interceptor and the HTTP front share it
    server = grpc.aio.server(
        interceptors=security.interceptors(token),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    service = DigitClassifierService(
        model, batcher, ServiceLimits(config.max_images_per_request, config.max_message_bytes)
    )
    add_to_server(service, server)
    v2 = InferenceService(service)
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(v2, server)
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
        app = build_app(service, v2, config.max_message_bytes, token)
        http = HttpFront(app, config.host, config.http_port, reuse_port=reuse_port)
        try:
            await http.start()
        except OSError as exc:
            raise StartupError(f"cannot serve HTTP on port {config.http_port} ({exc})") from None
    batcher.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    card = model.card
    metrics.MODEL_INFO.labels(card.name, card.version, model.provider, model.file_sha256).set(1)
    reloader = None
    if config.reload_interval_s > 0:
        reloader = ModelReloader(
            config.model, config.inference, batcher, service, config.reload_interval_s
        )
        reloader.start()
    return RunningServer(server, port, health_servicer, service, batcher, reloader, http)


async def serve(config: ServerConfig, *, reuse_port: bool = False) -> int:
    """Run one server until SIGTERM/SIGINT, then drain. Returns the exit code."""
    try:
        model = load_model(config.model, config.inference)
        running = await start_server(config, model, reuse_port=reuse_port)
    except (ModelError, StartupError) as exc:
        log.error("not starting: %s", exc)
        return 1
    host = config.host
    log.info(
        "serving",
        extra={
            "fields": {
                "model": str(config.model),
                "name": model.card.name,
                "version": model.card.version,
                "sha256": model.file_sha256,
                "provider": model.provider,
                "max_batch_size": config.max_batch_size,
                "max_delay_us": config.max_delay_us,
                "max_queue_size": config.max_queue_size,
                "max_images_per_request": config.max_images_per_request,
                "address": f"{host}:{running.port}",
                "http_port": running.http.port if running.http else "off",
                "tls": "mutual" if config.tls_client_ca else "on" if config.tls_cert else "off",
                "auth": "bearer token" if config.auth_token_file else "none",
                "pid": os.getpid(),
            }
        },
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info(
        "draining",
        extra={
            "fields": {
                "grace_s": config.grace_s,
                "accepted_requests": running.service.active_requests,
                "queued_images": running.batcher.queued_images,
            }
        },
    )
    await running.stop(config.grace_s)
    log.info("stopped")
    return 0


def run(config: ServerConfig) -> int:
    """The process entry point: one server, or a supervisor of `config.workers` servers."""
    if config.workers == 1:
        if config.metrics_port is not None:
            _start_metrics(config)
        return asyncio.run(serve(config))
    return _supervise(config)


def _start_metrics(config: ServerConfig) -> None:
    try:
        server = metrics.serve_metrics(config.metrics_port or 0, config.metrics_host)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on port {config.metrics_port} ({exc})") from None
    log.info(
        "metrics",
        extra={
            "fields": {
                "address": f"{config.metrics_host or '0.0.0.0'}:{server.server_port}",
                "path": "/metrics",
            }
        },
    )


def _supervise(config: ServerConfig) -> int:
    """N worker processes share the port through SO_REUSEPORT; the kernel spreads connections.

    Metrics: each worker writes to a shared PROMETHEUS_MULTIPROC_DIR and this process serves
    their sum, so one scrape sees the whole server.
    """
    with (
        tempfile.TemporaryDirectory(prefix="digits-metrics-") as metrics_dir,
        _reserve_port(config) as port,
    ):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        if config.metrics_port is not None:
            _start_metrics(config)
        worker_config = replace(config, port=port, workers=1, metrics_port=None)
        context = multiprocessing.get_context("spawn")
        workers = [
            context.Process(target=_worker_main, args=(worker_config,), name=f"worker-{i}")
            for i in range(config.workers)
        ]
        for worker in workers:
            worker.start()
        stopping = False

        def forward(signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True
            for worker in workers:
                if worker.pid and worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        alive = list(workers)
        while alive:
            multiprocessing.connection.wait([w.sentinel for w in alive])
            for worker in [w for w in alive if not w.is_alive()]:
                alive.remove(worker)
                if worker.exitcode != 0 and not stopping:
                    log.error(
                        "%s exited with %s; stopping the others", worker.name, worker.exitcode
                    )
                    forward(signal.SIGTERM, None)
        return 0 if all(w.exitcode == 0 for w in workers) else 1


@contextlib.contextmanager
def _reserve_port(config: ServerConfig) -> Any:
    """Port 0 means "any free port"; every worker must get the same one, so pick it here and
    hold it (bound, not listening) with SO_REUSEPORT until the workers are done."""
    if config.port != 0:
        yield config.port
        return
    host = config.host.strip("[]") or "::"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, 0))
        yield holder.getsockname()[1]


def _worker_main(config: ServerConfig) -> None:
    configure_logging(config.log_level, config.log_format)
    sys.exit(asyncio.run(serve(config, reuse_port=True)))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return line


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
