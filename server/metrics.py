"""Prometheus metrics. With `--workers N` each worker writes to PROMETHEUS_MULTIPROC_DIR and
the supervisor serves the sum; the `multiprocess_mode` arguments matter only then."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

_LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Per-model series carry `model` and `version`: the served name and version, or "" for calls
# refused before a model was chosen (never a name the caller made up: that would let callers
# create series without bound).
_MODEL = ["model", "version"]
REQUESTS = Counter(
    "digits_requests_total",
    "RPCs answered, by method, gRPC status code, model and version",
    ["method", "code", *_MODEL],
)
LATENCY = Histogram(
    "digits_request_latency_seconds",
    "RPC handling time, by method, model and version",
    ["method", *_MODEL],
    buckets=_LATENCY_BUCKETS,
)
IMAGES = Counter("digits_images_total", "Images classified successfully", _MODEL)
QUEUE_WAIT = Histogram(
    "digits_queue_wait_seconds",
    "Time from arrival in the queue to the first model run",
    _MODEL,
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "digits_batch_size_images", "Images per executed model run", _MODEL, buckets=_BATCH_BUCKETS
)
BATCH_COMPUTE = Histogram(
    "digits_batch_compute_seconds",
    "Time inside the model per run",
    _MODEL,
    buckets=_LATENCY_BUCKETS,
)
FAILED_BATCHES = Counter("digits_failed_batches_total", "Model runs that raised", _MODEL)
QUEUE_DEPTH = Gauge(
    "digits_queue_depth_images",
    "Images waiting for a model run",
    _MODEL,
    multiprocess_mode="livesum",
)
IN_FLIGHT = Gauge(
    "digits_requests_in_flight",
    "Accepted requests not answered yet (queued or computing)",
    multiprocess_mode="livesum",
)
REJECTED = Counter("digits_rejected_total", "Requests refused because the queue was full", _MODEL)
SKIPPED = Counter(
    "digits_skipped_total",
    "Queued requests dropped before computing, by reason",
    ["reason", *_MODEL],
)
RELOADS = Counter(
    "digits_model_reloads_total",
    "Repository changes, by result (ok, refused, unloaded)",
    ["result", *_MODEL],
)
MODEL_INFO = Gauge(
    "digits_model_info",
    "The models being served (value 1)",
    ["name", "version", "provider", "sha256"],
    multiprocess_mode="liveall",
)


@functools.cache
def request_series(method: str, code: str, model: str, version: str) -> tuple[Any, Any]:
    """The (count, latency) series of one method, status code and model version. Cached:
    `labels()` takes a lock and validates its arguments, a measurable cost on every request."""
    return REQUESTS.labels(method, code, model, version), LATENCY.labels(method, model, version)


@dataclass(frozen=True)
class VersionSeries:
    """The series of one served model version, resolved once when it is loaded."""

    images: Any
    queue_wait: Any
    batch_size: Any
    batch_compute: Any
    failed_batches: Any
    queue_depth: Any
    rejected: Any
    skipped: dict[str, Any]

    @classmethod
    def of(cls, model: str, version: str) -> VersionSeries:
        return cls(
            IMAGES.labels(model, version),
            QUEUE_WAIT.labels(model, version),
            BATCH_SIZE.labels(model, version),
            BATCH_COMPUTE.labels(model, version),
            FAILED_BATCHES.labels(model, version),
            QUEUE_DEPTH.labels(model, version),
            REJECTED.labels(model, version),
            {
                reason: SKIPPED.labels(reason, model, version)
                for reason in ("cancelled", "deadline")
            },
        )


def serve_metrics(port: int, host: str = "") -> Any:
    """Start the /metrics HTTP endpoint in a thread; returns the bound server."""
    registry = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    if registry is None:
        server, _thread = start_http_server(port, addr=host)
    else:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
