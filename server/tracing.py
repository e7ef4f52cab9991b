"""OpenTelemetry traces, off unless an exporter is asked for.

The standard variables configure it: OTEL_TRACES_EXPORTER (otlp, console, none; a comma list),
OTEL_EXPORTER_OTLP_ENDPOINT / ..._TRACES_ENDPOINT (set, with no OTEL_TRACES_EXPORTER: otlp),
OTEL_EXPORTER_OTLP_PROTOCOL / ..._TRACES_PROTOCOL (grpc, the default here, or http/protobuf,
which needs the opentelemetry-exporter-otlp-proto-http package), OTEL_SERVICE_NAME,
OTEL_SDK_DISABLED, and the exporters' own OTEL_EXPORTER_OTLP_* settings.

Every call is one span, continuing the caller's W3C `traceparent` (gRPC metadata or HTTP
headers), named and described by OpenTelemetry's semantic conventions: gRPC calls as
`digits.v1.DigitClassifier/Classify` with rpc.system, rpc.service, rpc.method and the integer
rpc.grpc.status_code; HTTP routes as `POST /v2/models/{name}/infer` with
http.request.method, http.route and http.response.status_code. Its children are its queue
wait and its model run; every model run is one span too, carrying the batch size and linked to
the call spans it served. With tracing off, each call costs one attribute test.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpCall:
    """An HTTP request as its span needs it: the headers (traceparent), the method, the
    route's template (/v2/models/{name}/infer, never the path: the model names callers type
    would make every path a span name of its own) and the front's status for a gRPC code."""

    headers: Mapping[str, str]
    method: str
    route: str
    http_status: Callable[[str], int]  # a gRPC status code's name -> the HTTP status sent


# gRPC metadata (read lazily, by calling it), HTTP headers, or an HTTP call: where a caller's
# traceparent is.
Carrier = Callable[[], Iterable[tuple[str, Any]]] | Mapping[str, str] | HttpCall | None
_OFF: AbstractContextManager[None] = nullcontext()

log = logging.getLogger(__name__)
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
EXPORTERS = ("otlp", "console", "none")
# The semantic conventions' server-side errors: a caller's mistake (INVALID_ARGUMENT,
# NOT_FOUND, RESOURCE_EXHAUSTED...) is not the server failing.
_GRPC_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_HTTP_PACKAGE = "opentelemetry-exporter-otlp-proto-http"


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(_exporter_names(environ)) and (
        environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
    )


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    value = environ.get("OTEL_TRACES_EXPORTER")
    if value is None:  # the SDK's default (otlp), but only where an endpoint says where to
        return ["otlp"] if any(environ.get(name) for name in _ENDPOINTS) else []
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    return [] if "none" in names else names


def _protocol(environ: Mapping[str, str]) -> str:
    for name in _PROTOCOLS:
        if environ.get(name):
            return environ[name].strip().lower()
    return "grpc"


def span_exporters(environ: Mapping[str, str] = os.environ) -> tuple[list[Any], list[str]]:
    """The exporters the environment asks for, and one line for each it asks for in vain
    (an unknown name or protocol, a package not installed)."""
    if not requested(environ):
        return [], []
    exporters, problems = [], []
    for name in dict.fromkeys(_exporter_names(environ)):  # each once, in order
        try:
            exporters.append(_exporter(name, environ))
        except _Unavailable as exc:
            problems.append(str(exc))
    return exporters, problems


class _Unavailable(Exception):
    pass


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise _Unavailable(
            f"OTEL_TRACES_EXPORTER={name} is not supported here: use "
            f"{', '.join(EXPORTERS)} (a comma list)"
        )
    protocol = _protocol(environ)
    if protocol not in ("grpc", "http/protobuf"):
        raise _Unavailable(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported here: use grpc or "
            "http/protobuf"
        )
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.http import trace_exporter

        return trace_exporter.OTLPSpanExporter()
    except ImportError as exc:
        package = _HTTP_PACKAGE if protocol == "http/protobuf" else "opentelemetry-exporter-otlp"
        raise _Unavailable(
            f"OTLP over {protocol} needs the {package} package (pip install {package}): {exc}"
        ) from None


def configuration_problems(environ: Mapping[str, str] = os.environ) -> list[str]:
    """What the OTEL_* variables ask for that cannot be done: said once at start (app.run),
    not once per worker."""
    try:
        return span_exporters(environ)[1]
    except ImportError as exc:  # the SDK itself
        return [f"tracing is asked for but the OpenTelemetry SDK is missing ({exc})"]


@dataclass(frozen=True)
class CallSpan:
    """The span of one call, and how its front reports statuses (None: gRPC)."""

    span: Any
    http: HttpCall | None = None


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
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            exporters, problems = span_exporters()
        except ImportError as exc:
            log.debug("tracing is off (%s)", exc)  # said at start: configuration_problems
            return cls()
        for problem in problems:
            log.debug("tracing: %s", problem)
        if not exporters:
            return cls()
        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider.get_tracer("digit_recognizer.server"), provider)

    def call(self, method: str, carrier: Carrier) -> AbstractContextManager[Any]:
        """The span of one call, current while it runs (a CallSpan); None when tracing is off.
        `method`: the gRPC method's name (Classify), or the HTTP route's metric name."""
        return self._call(method, carrier) if self.enabled else _OFF

    @contextmanager
    def _call(self, method: str, carrier: Carrier) -> Iterator[CallSpan]:
        from opentelemetry import propagate, trace

        http = carrier if isinstance(carrier, HttpCall) else None
        items: Iterable[tuple[str, Any]] = ()
        if http is not None:
            name = f"{http.method} {http.route}"
            attributes = {"http.request.method": http.method, "http.route": http.route}
            items = http.headers.items()
        else:
            service = _service_of(method)
            name = f"{service}/{method}" if service else method
            attributes = {"rpc.system": "grpc", "rpc.method": method}
            if service:
                attributes["rpc.service"] = service
            if callable(carrier):
                items = carrier()
            elif isinstance(carrier, Mapping):
                items = carrier.items()
        headers = {key.lower(): value for key, value in items if isinstance(value, str)}
        parent = propagate.extract(headers)
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield CallSpan(span, http)

    def finish_call(self, call: CallSpan | None, model: str, version: str, code: str) -> None:
        """`code`: the gRPC status code's name the call ended with (HTTP calls too: the data
        plane speaks gRPC codes; the front's own mapping gives the HTTP status)."""
        if call is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span = call.span
        if call.http is not None:
            status = call.http.http_status(code)
            span.set_attribute("http.response.status_code", status)
            failed = status >= 500
        else:
            span.set_attribute("rpc.grpc.status_code", _grpc_code_number(code))
            failed = code in _GRPC_SERVER_ERRORS
        if model:
            span.set_attribute("digits.model", model)
            span.set_attribute("digits.model_version", version)
        if failed:
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


def _grpc_code_number(name: str) -> int:
    return _grpc_codes()[name]


@functools.cache
def _grpc_codes() -> dict[str, int]:
    import grpc

    return {code.name: int(code.value[0]) for code in grpc.StatusCode}


def _service_of(method: str) -> str:
    """The full name of the gRPC service serving `method` ("" if none does)."""
    return _services().get(method, "")


@functools.cache
def _services() -> dict[str, str]:
    """Method name -> service: the fronts' method names are unique across digits.v1 and the
    Open Inference Protocol (the first service keeps a name, should that ever change)."""
    from digit_recognizer.protos import digits_pb2, inference_pb2

    services: dict[str, str] = {}
    for module in (digits_pb2, inference_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for rpc in service.methods:
                services.setdefault(rpc.name, service.full_name)
    return services
