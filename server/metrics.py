"""Prometheus metrics. With `--workers N` each worker writes to PROMETHEUS_MULTIPROC_DIR and
the supervisor serves the sum; the `multiprocess_mode` arguments matter only then.

Series are bounded: per-model labels name only versions that were served (refusals carry the
model's name only while it serves, else none), and a retired version's series are removed
(`forget_version`), so their number follows what is served (at most --max-models versions),
not what was ever put in the repository. prometheus_client cannot remove series in
multi-process mode: there a worker keeps a retired version's series until it restarts."""

from __future__ import annotations

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


# Every metric with per-model labels, with its label names: what forget_version() removes.
_PER_MODEL = (
    (REQUESTS, ("method", "code", *_MODEL)),
    (LATENCY, ("method", *_MODEL)),
    (IMAGES, tuple(_MODEL)),
    (QUEUE_WAIT, tuple(_MODEL)),
    (BATCH_SIZE, tuple(_MODEL)),
    (BATCH_COMPUTE, tuple(_MODEL)),
    (FAILED_BATCHES, tuple(_MODEL)),
    (QUEUE_DEPTH, tuple(_MODEL)),
    (REJECTED, tuple(_MODEL)),
    (SKIPPED, ("reason", *_MODEL)),
    (RELOADS, ("result", *_MODEL)),
    (MODEL_INFO, ("name", "version", "provider", "sha256")),
)
_requests: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
# Versions whose series were removed, until served again: a call that was still finishing
# when its version retired is not counted, rather than bringing the series back for good.
_retired: set[tuple[str, str]] = set()


class _Dropped:
    """A series that counts nothing (a retired version's late calls)."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_DROPPED = _Dropped()


def request_series(method: str, code: str, model: str, version: str) -> tuple[Any, Any]:
    """The (count, latency) series of one method, status code and model version. Cached:
    `labels()` takes a lock and validates its arguments, a measurable cost on every request."""
    key = (method, code, model, version)
    series = _requests.get(key)
    if series is None:
        if (model, version) in _retired:
            return _DROPPED, _DROPPED
        series = REQUESTS.labels(*key), LATENCY.labels(method, model, version)
        _requests[key] = series
    return series


def forget_version(model: str, version: str) -> None:
    """Remove every series of a version no longer served."""
    if _multiprocess():
        return
    _retired.add((model, version))
    for key in [k for k in _requests if k[2:] == (model, version)]:
        del _requests[key]
    _remove({"model": model, "version": version})
    _remove({"name": model, "version": version})


def forget_model(model: str) -> None:
    """Remove the series labelled with a model that serves no version any more."""
    if _multiprocess():
        return
    for key in [k for k in _requests if k[2] == model]:
        _retired.add((model, key[3]))
        del _requests[key]
    _remove({"model": model})
    _remove({"name": model})


def forget_model_info(name: str, version: str, provider: str, sha256: str) -> None:
    """Remove the model-info series of a file that was replaced (its version serves on)."""
    if not _multiprocess():
        MODEL_INFO.remove(name, version, provider, sha256)


def _remove(match: dict[str, str]) -> None:
    """Remove every series whose labels include `match`. Through collect(), the public way to
    see a metric's label values (remove_by_labels is newer than our prometheus_client floor)."""
    for metric, names in _PER_MODEL:
        if not set(match) <= set(names):
            continue
        found = {
            tuple(sample.labels[name] for name in names)
            for family in metric.collect()
            for sample in family.samples
            if all(sample.labels.get(key) == value for key, value in match.items())
        }
        for values in found:
            metric.remove(*values)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


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
        _retired.discard((model, version))  # served (again)
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
