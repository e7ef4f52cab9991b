"""Prometheus metrics. With `--workers N` each worker writes to PROMETHEUS_MULTIPROC_DIR and
the supervisor serves the sum; the `multiprocess_mode` arguments matter only then."""

from __future__ import annotations

import functools
import os
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

REQUESTS = Counter(
    "digits_requests_total", "RPCs answered, by method and gRPC status code", ["method", "code"]
)
IMAGES = Counter("digits_images_total", "Images classified successfully")
LATENCY = Histogram(
    "digits_request_latency_seconds",
    "RPC handling time, by method",
    ["method"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "digits_queue_wait_seconds",
    "Time from arrival in the queue to the first model run",
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "digits_batch_size_images", "Images per executed model run", buckets=_BATCH_BUCKETS
)
BATCH_COMPUTE = Histogram(
    "digits_batch_compute_seconds", "Time per model run", buckets=_LATENCY_BUCKETS
)
FAILED_BATCHES = Counter("digits_failed_batches_total", "Model runs that raised")
QUEUE_DEPTH = Gauge(
    "digits_queue_depth_images", "Images waiting for a model run", multiprocess_mode="livesum"
)
IN_FLIGHT = Gauge(
    "digits_requests_in_flight",
    "Accepted requests not answered yet (queued or computing)",
    multiprocess_mode="livesum",
)
REJECTED = Counter("digits_rejected_total", "Requests refused because the queue was full")
SKIPPED = Counter(
    "digits_skipped_total", "Queued requests dropped before computing, by reason", ["reason"]
)
RELOADS = Counter("digits_model_reloads_total", "Hot reloads, by result (ok, refused)", ["result"])
MODEL_INFO = Gauge(
    "digits_model_info",
    "The model being served (value 1)",
    ["name", "version", "provider", "sha256"],
    multiprocess_mode="liveall",
)


@functools.cache
def request_series(method: str, code: str) -> tuple[Any, Any]:
    """The (count, latency) series of one method and status code. Cached: `labels()` takes a
    lock and validates its arguments, a measurable cost on every request."""
    return REQUESTS.labels(method, code), LATENCY.labels(method)


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
