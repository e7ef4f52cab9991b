"""Traces across services: a real server exports OTLP/gRPC to a collector stand-in built from
opentelemetry-proto's own service definition, so spans are checked as a collector gets them."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

otlp = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402
from opentelemetry.proto.trace.v1 import trace_pb2  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

from digit_recognizer.client.client import AsyncDigitClient  # noqa: E402

from onnx_models import one_hot_image  # noqa: E402
from waiting import until  # noqa: E402


class Collector(otlp.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[dict, trace_pb2.Span]] = []
        self.upstream = None  # the caller's span context

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(resource, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_a_call_continues_the_callers_trace_with_queue_model_and_batch_spans(
    processes, tiny_model_path, monkeypatch
):
    collector = Collector()
    sink = grpc.aio.server()
    otlp.add_TraceServiceServicer_to_server(collector, sink)
    sink_port = sink.add_insecure_port("127.0.0.1:0")
    await sink.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{sink_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "digits-under-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = processes("--model", str(tiny_model_path))
    try:
        port = server.wait_serving()
        await _calls_then_stop(server, port, collector)
    finally:
        await sink.stop(0)
    _check(collector)


async def _calls_then_stop(server, port: int, collector: Collector) -> None:

    caller = TracerProvider().get_tracer("caller")  # another team's service, tracing
    async with AsyncDigitClient(f"127.0.0.1:{port}") as client:
        with caller.start_as_current_span("checkout") as upstream:
            assert (await client.classify(one_hot_image(4))).digit == 4
        untraced = await client.classify(one_hot_image(5))  # a call without a caller's trace
    assert untraced.digit == 5
    collector.upstream = upstream.get_span_context()
    await until(lambda: sum(s.name == "Classify" for _, s in collector.spans) >= 2, "spans", 30)
    server.proc.send_signal(signal.SIGTERM)
    code, _ = await asyncio.to_thread(server.finish)
    assert code == 0


def _check(collector: Collector) -> None:
    upstream_context = collector.upstream

    by_name: dict[str, list[trace_pb2.Span]] = {}
    for resource, span in collector.spans:
        assert resource["service.name"] == "digits-under-test"
        by_name.setdefault(span.name, []).append(span)
    traced = [s for s in by_name["Classify"] if s.parent_span_id]
    assert len(traced) == 1, by_name["Classify"]
    call = traced[0]
    assert call.trace_id == upstream_context.trace_id.to_bytes(16, "big")
    assert call.parent_span_id == upstream_context.span_id.to_bytes(8, "big")
    assert call.kind == trace_pb2.Span.SPAN_KIND_SERVER
    attributes = {a.key: a.value for a in call.attributes}
    assert attributes["digits.model"].string_value == "tiny"
    for child in ("queue wait", "model run"):
        (span,) = [s for s in by_name[child] if s.parent_span_id == call.span_id]
        assert span.trace_id == call.trace_id
        assert call.start_time_unix_nano <= span.start_time_unix_nano <= call.end_time_unix_nano
    runs = [
        s for s in by_name["batch run"] if any(link.span_id == call.span_id for link in s.links)
    ]
    assert len(runs) == 1
    assert {a.key: a.value.int_value for a in runs[0].attributes}["digits.batch_size"] == 1


def test_json_log_lines_carry_the_current_trace_and_span():
    import json
    import logging

    from digit_recognizer.server.logs import JsonFormatter

    record = logging.LogRecord("digits", logging.ERROR, __file__, 1, "model run failed", (), None)
    outside = json.loads(JsonFormatter().format(record))
    assert "trace_id" not in outside and outside["time"].count(".") == 1  # milliseconds
    with TracerProvider().get_tracer("t").start_as_current_span("Classify") as span:
        inside = json.loads(JsonFormatter().format(record))
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
