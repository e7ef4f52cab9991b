"""OpenTelemetry traces, off unless OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set.

The standard variables configure it (OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_*, OTEL_SDK_DISABLED).
Every call is one span, continuing the caller's W3C `traceparent` (gRPC metadata or HTTP
headers), with child spans for its queue wait and its model run; every model run is one span
too, carrying the batch size and linked to the call spans it served. Exported over OTLP/gRPC
in batches. With tracing off, each call costs one attribute test.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

# gRPC metadata (read lazily, by calling it) or HTTP headers: where a caller's traceparent is.
Carrier = Callable[[], Iterable[tuple[str, Any]]] | Mapping[str, str] | None
_OFF: AbstractContextManager[None] = nullcontext()

log = logging.getLogger(__name__)
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def requested() -> bool:
    return any(os.environ.get(name) for name in _ENDPOINTS) and (
        os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
    )


class Tracing:
    """Spans for the data plane; `enabled` False makes every method a no-op."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self.enabled = tracer is not None
        self._tracer = tracer
        self._provider = provider
        # Spans take wall-clock nanoseconds; the batcher measures on the monotonic clock.
        self._wall_minus_monotonic_ns = time.time_ns() - time.monotonic_ns()

    @classmethod
    def from_environment(cls, service_name: str = "digit-server") -> Tracing:
        if not requested():
            return cls()
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing is off (%s)", exc)
            return cls()
        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider.get_tracer("digit_recognizer.server"), provider)

    def call(self, method: str, carrier: Carrier) -> AbstractContextManager[Any]:
        """The span of one call, current while it runs; None when tracing is off."""
        return self._call(method, carrier) if self.enabled else _OFF

    @contextmanager
    def _call(self, method: str, carrier: Carrier) -> Iterator[Any]:
        from opentelemetry import propagate, trace

        items = carrier() if callable(carrier) else (carrier or {}).items()
        headers = {key.lower(): value for key, value in items if isinstance(value, str)}
        parent = propagate.extract(headers)
        kind = trace.SpanKind.SERVER
        with self._tracer.start_as_current_span(
            method, context=parent, kind=kind, record_exception=False, set_status_on_exception=False
        ) as span:
            yield span

    def finish_call(self, span: Any, model: str, version: str, code: str) -> None:
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("rpc.grpc.status_code", code)
        if model:
            span.set_attribute("digits.model", model)
            span.set_attribute("digits.model_version", version)
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, code))

    def stages(self, span: Any, arrived_s: float, queue_us: int, compute_us: int) -> None:
        """Child spans of a call: its wait in the queue, then its time in the model."""
        if span is None:
            return
        from opentelemetry import trace

        parent = trace.set_span_in_context(span)
        start = self._wall_ns(arrived_s)
        queued_until = start + queue_us * 1000
        for name, begin, end in (
            ("queue wait", start, queued_until),
            ("model run", queued_until, queued_until + compute_us * 1000),
        ):
            self._tracer.start_span(name, context=parent, start_time=begin).end(end_time=end)

    def current_span(self) -> Any:
        """The call span of the running call (None when tracing is off)."""
        if not self.enabled:
            return None
        from opentelemetry import trace

        return trace.get_current_span()

    def batch(self, started_s: float, seconds: float, size: int, callers: list[Any]) -> None:
        """One model run: a span of its own, linked to the calls it served."""
        if not self.enabled:
            return
        from opentelemetry.trace import Link

        links = [Link(context) for context in callers if context is not None]
        start = self._wall_ns(started_s)
        span = self._tracer.start_span(
            "batch run", start_time=start, links=links, attributes={"digits.batch_size": size}
        )
        span.end(end_time=start + int(seconds * 1e9))

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes what is still batched

    def _wall_ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._wall_minus_monotonic_ns
