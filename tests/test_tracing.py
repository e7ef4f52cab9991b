"""Traces across services: a real server exports OTLP/gRPC to a collector stand-in built from
opentelemetry-proto's own service definition, so spans are checked as a collector gets them;
span names and attributes follow OpenTelemetry's semantic conventions (rpc.*, http.*)."""

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

CLASSIFY = "digits.v1.DigitClassifier/Classify"  # the conventions' name: $service/$method


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
    await until(lambda: sum(s.name == CLASSIFY for _, s in collector.spans) >= 2, "spans", 30)
    server.proc.send_signal(signal.SIGTERM)
    code, _ = await asyncio.to_thread(server.finish)
    assert code == 0


def _check(collector: Collector) -> None:
    upstream_context = collector.upstream

    by_name: dict[str, list[trace_pb2.Span]] = {}
    for resource, span in collector.spans:
        assert resource["service.name"] == "digits-under-test"
        by_name.setdefault(span.name, []).append(span)
    traced = [s for s in by_name[CLASSIFY] if s.parent_span_id]
    assert len(traced) == 1, by_name[CLASSIFY]
    call = traced[0]
    assert call.trace_id == upstream_context.trace_id.to_bytes(16, "big")
    assert call.parent_span_id == upstream_context.span_id.to_bytes(8, "big")
    assert call.kind == trace_pb2.Span.SPAN_KIND_SERVER
    attributes = {a.key: a.value for a in call.attributes}
    assert attributes["digits.model"].string_value == "tiny"
    assert attributes["rpc.system"].string_value == "grpc"
    assert attributes["rpc.service"].string_value == "digits.v1.DigitClassifier"
    assert attributes["rpc.method"].string_value == "Classify"
    assert attributes["rpc.grpc.status_code"].WhichOneof("value") == "int_value"
    assert attributes["rpc.grpc.status_code"].int_value == 0
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


@pytest.fixture
async def traced_server(start_server, tiny_model_path):
    """An in-process server whose spans land in memory, as the SDK finishes them."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from digit_recognizer.server.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = await start_server(tiny_model_path, http_port=0)
    tracing = Tracing(provider.get_tracer("test"), provider)
    server.plane.tracing = tracing
    for served in server.plane.served():
        served.tracing = tracing
    return server, exporter


def _calls(exporter) -> dict[str, list]:
    spans: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        if span.kind.name == "SERVER":
            spans.setdefault(span.name, []).append(span)
    return spans


async def test_grpc_spans_follow_the_rpc_conventions(traced_server):
    from opentelemetry.trace import StatusCode

    from digit_recognizer.client.errors import DigitClientError
    from digit_recognizer.protos import digits_pb2, digits_pb2_grpc

    server, exporter = traced_server
    async with AsyncDigitClient(f"127.0.0.1:{server.port}", connections=1) as client:
        assert (await client.classify(one_hot_image(3))).digit == 3
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # a value out of [0, 1]
            await stub.Classify(digits_pb2.ClassifyRequest(pixels=[2.0] * 784))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with AsyncDigitClient(f"127.0.0.1:{server.port}", model="nope", connections=1) as client:
        with pytest.raises(DigitClientError, match="no model 'nope'"):
            await client.model_info()
    spans = _calls(exporter)
    classify = spans[CLASSIFY]
    codes = sorted(span.attributes["rpc.grpc.status_code"] for span in classify)
    assert codes == [0, 3]  # OK, INVALID_ARGUMENT: integers, as the conventions say
    for span in classify:
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "digits.v1.DigitClassifier"
        assert span.attributes["rpc.method"] == "Classify"
        # A caller's mistake is not the server's error (only UNKNOWN, INTERNAL... are).
        assert span.status.status_code == StatusCode.UNSET
    (info,) = spans["digits.v1.DigitClassifier/GetModelInfo"]
    assert info.attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND


async def test_http_spans_follow_the_http_conventions(traced_server):
    import aiohttp

    server, exporter = traced_server
    image = one_hot_image(6).tolist()
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": image}]}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
        assert (await http.post("/v2/models/tiny/infer", json=body)).status == 200
        assert (await http.post("/v2/models/nope/infer", json=body)).status == 404
        assert (await http.post("/v2/models/tiny/infer", json={"inputs": "x"})).status == 400
    spans = _calls(exporter)
    infer = spans["POST /v2/models/{name}/infer"]  # the route, not the path
    assert sorted(s.attributes["http.response.status_code"] for s in infer) == [200, 400, 404]
    for span in infer:
        assert span.attributes["http.request.method"] == "POST"
        assert span.attributes["http.route"] == "/v2/models/{name}/infer"
        assert "rpc.system" not in span.attributes and "rpc.grpc.status_code" not in span.attributes


def test_the_exporters_come_from_the_standard_variables():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from digit_recognizer.server.tracing import requested, span_exporters

    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert span_exporters({}) == ([], []) and not requested({})
    ((grpc_exporter,), problems) = span_exporters(endpoint)
    assert isinstance(grpc_exporter, OTLPSpanExporter) and problems == []
    assert span_exporters({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) == ([], [])
    assert span_exporters({**endpoint, "OTEL_SDK_DISABLED": "true"}) == ([], [])
    ((console,), _) = span_exporters({"OTEL_TRACES_EXPORTER": "console"})  # no endpoint needed
    assert isinstance(console, ConsoleSpanExporter)
    both, _ = span_exporters({**endpoint, "OTEL_TRACES_EXPORTER": "otlp,console"})
    assert [type(e).__name__ for e in both] == ["OTLPSpanExporter", "ConsoleSpanExporter"]
    exporters, problems = span_exporters({"OTEL_TRACES_EXPORTER": "zipkin,console"})
    assert len(exporters) == 1 and problems == [
        "OTEL_TRACES_EXPORTER=zipkin is not supported here: use otlp, console, none (a comma list)"
    ]
    _, problems = span_exporters({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert problems and "use grpc or http/protobuf" in problems[0]


def test_otlp_http_protobuf_is_honoured_or_named_as_missing():
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf: the HTTP exporter when installed, else one
    line naming the package to install (never a silent fallback to gRPC)."""
    import importlib.util

    from digit_recognizer.server.tracing import span_exporters

    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    exporters, problems = span_exporters(environ)
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        assert exporters == [] and len(problems) == 1
        assert "pip install opentelemetry-exporter-otlp-proto-http" in problems[0]
    else:
        (exporter,) = exporters
        assert type(exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.http")
    traces_only = {**environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}  # the more precise
    assert type(span_exporters(traces_only)[0][0]).__module__.endswith("proto.grpc.trace_exporter")


async def test_a_server_exports_over_otlp_http_protobuf(processes, tiny_model_path, monkeypatch):
    """End to end over OTLP/HTTP: a collector stand-in that takes POST /v1/traces."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from aiohttp import web

    received: list[trace_pb2.Span] = []

    async def export(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                received.extend(scope_spans.spans)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = processes("--model", str(tiny_model_path))
    try:
        grpc_port = await asyncio.to_thread(server.wait_serving)
        async with AsyncDigitClient(f"127.0.0.1:{grpc_port}") as client:
            assert (await client.classify(one_hot_image(1))).digit == 1
        await until(lambda: any(s.name == CLASSIFY for s in received), "an OTLP/HTTP export", 30)
        server.proc.send_signal(signal.SIGTERM)
        code, log = await asyncio.to_thread(server.finish)
        assert code == 0 and "tracing:" not in log, log
    finally:
        await runner.cleanup()


def test_a_tracing_setting_that_cannot_be_honoured_is_said_once_at_start(
    processes, tiny_model_path, monkeypatch
):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    server = processes("--model", str(tiny_model_path), "--workers", "2")
    server.wait_serving()
    server.proc.send_signal(signal.SIGTERM)
    code, log = server.finish()
    assert code == 0 and log.count("OTEL_TRACES_EXPORTER=zipkin is not supported") == 1, log
