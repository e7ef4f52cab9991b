"""Hardening, round two (issue 23, items 3-7): no request of any size holds the event loop,
slow or malformed HTTP cannot pile up connections or logs, names callers send are echoed
cut, and one gRPC connection cannot take the server from the others. Real servers on
127.0.0.1:0, in this process: their event loop is the test's, so a stall is measured here."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from onnx_models import one_hot_image
from waiting import until

INFER = "/v2/models/tiny/infer"


class LoopGaps:
    """The longest the event loop went without running a 5 ms ticker, while in the block."""

    def __init__(self) -> None:
        self.worst_s = 0.0

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.worst_s = max(self.worst_s, now - last - 0.005)
            last = now

    async def __aenter__(self) -> LoopGaps:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.02)  # ticking
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()


def infer_json(images: int, values: list[float] | None = None, **extra: object) -> bytes:
    data = values if values is not None else [0.0] * (images * 784)
    item = {"name": "pixels", "datatype": "FP32", "shape": [images, 784], "data": data}
    return json.dumps({"inputs": [item], **extra}, separators=(",", ":")).encode()


async def post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/json"}
        async with session.post(f"http://127.0.0.1:{port}{path}", data=body, headers=headers) as r:
            return r.status, await r.json()


# Item 3: JSON infer bodies.


async def test_big_json_bodies_never_hold_the_event_loop(start_server, tiny_model_path):
    """The probe: parsed on the loop, a 16.8 MB body of 5,349 images held it 1.1-2.4 s before
    its 400, and a legal 1,024 images (7.2 MB) 0.25-0.65 s. 250 ms is the issue's bound; in a
    worker process the loop's worst here was ~30 ms."""
    server = await start_server(tiny_model_path, http_port=0)
    hostile = infer_json(5349)
    values = np.round(np.random.default_rng(0).random(1024 * 784), 5)
    legal = infer_json(1024, values.tolist())
    async with LoopGaps() as gaps:
        status, reply = await post(server.http.port, INFER, hostile)
    assert status == 400 and "holds 5349 images; at most 1024" in reply["error"], reply
    assert gaps.worst_s < 0.25, gaps.worst_s
    async with LoopGaps() as gaps:
        status, reply = await post(server.http.port, INFER, legal)
    assert status == 200 and reply["outputs"][0]["shape"] == [1024, 10], reply
    assert gaps.worst_s < 0.25, gaps.worst_s


async def test_a_json_body_over_what_the_image_limit_needs_is_refused_unread(
    start_server, tiny_model_path
):
    """24 bytes a value (a float32's longest repr and ", ") for --max-images-per-request
    images, and 64 KB for the rest: past that a body cannot be a request this server takes."""
    server = await start_server(tiny_model_path, http_port=0, max_images_per_request=2)
    body = infer_json(60)  # 60 images of "0.0,": 188 KB, over the 103,168 bytes 2 images take
    started = time.monotonic()
    status, reply = await post(server.http.port, INFER, body)
    assert status == 400, reply
    assert "over the 103168 this route takes; send the tensors as binary data" in reply["error"]
    assert time.monotonic() - started < 5


async def test_the_json_besides_the_data_is_bounded(start_server, tiny_model_path):
    """What the worker hands back as Python objects (names, outputs, parameters) costs the
    loop to unpickle like parsing would: it is refused past 64 KB."""
    server = await start_server(tiny_model_path, http_port=0)
    body = infer_json(1, outputs=[{"name": "probabilities"}] * 10_000)
    status, reply = await post(server.http.port, INFER, body)
    assert status == 400 and "besides the inputs' data is" in reply["error"], reply
    one = infer_json(1, one_hot_image(4).tolist(), outputs=[{"name": "probabilities"}])
    status, reply = await post(server.http.port, INFER, one)
    assert status == 200 and np.argmax(reply["outputs"][0]["data"]) == 4, reply


# Item 4: slow request heads and open connections.


async def test_a_request_head_sent_slowly_is_cut_off(start_server, tiny_model_path):
    """Slowloris: a byte every 50 ms, never a whole head. aiohttp's default keeps such a
    connection for an hour (its keep-alive timeout, 3,630 s)."""
    server = await start_server(tiny_model_path, http_port=0, http_header_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http.port)
    started = time.monotonic()
    closed_after = None
    try:
        # A head that is valid so far and never ends: ~6 s of sending at this pace.
        for byte in b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 80:
            writer.write(bytes([byte]))
            try:
                if await asyncio.wait_for(reader.read(1), timeout=0.05) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
    except ConnectionError:
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after is not None, "the server kept a connection that never sent its head"
    assert 0.4 < closed_after < 4, closed_after


async def open_waiting(port: int, connections, count: int) -> tuple:
    """A connection that has sent nothing yet, once the server counts it."""
    pair = await asyncio.open_connection("127.0.0.1", port)
    await until(lambda: len(connections) == count, f"{count} HTTP connections open")
    return pair


async def open_mid_request(port: int, connections, busy: int) -> tuple:
    """A connection whose request is in progress: its body declared, a tenth of it sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
        + b"{" * 100
    )
    await until(lambda: connections.busy == busy, f"{busy} requests in progress")
    return reader, writer


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout=5) == b""
    except ConnectionError:
        return True


async def test_past_the_connection_cap_the_one_waiting_longest_is_closed(
    start_server, tiny_model_path
):
    server = await start_server(tiny_model_path, http_port=0, http_max_connections=3)
    port, connections = server.http.port, server.http.connections
    busy = await open_mid_request(port, connections, busy=1)  # the oldest, but in a request
    idle = await open_waiting(port, connections, 2)
    younger = await open_waiting(port, connections, 3)
    newest = await open_waiting(port, connections, 3)  # the fourth: one must go
    assert await closed(idle[0])  # waiting longest, not in a request
    newest[1].write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(newest[0].read(), timeout=10)).startswith(b"HTTP/1.1 200")
    busy[1].write(b" " * 900)  # its request goes on and is answered: 400, the body is not JSON
    assert (await asyncio.wait_for(busy[0].readline(), timeout=10)).startswith(b"HTTP/1.1 400")
    # Every connection in a request: a new one is closed, the others are left alone.
    for pair in (busy, younger, newest):
        pair[1].close()
    await until(lambda: len(connections) == 0, "the test's connections closed")
    held = [await open_mid_request(port, connections, busy=n) for n in (1, 2, 3)]
    late = await asyncio.open_connection("127.0.0.1", port)
    assert await closed(late[0])
    assert connections.busy == 3
    for _, writer in (*held, late):
        writer.close()


# Item 5: requests aiohttp cannot parse.


async def raw_reply(port: int, request: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    reply = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.decode(), body


async def test_a_malformed_request_is_a_json_400_and_one_warning(
    start_server, tiny_model_path, caplog
):
    """aiohttp's own answer was text/plain with its Server header, and each one logged a
    traceback at ERROR (4,210 requests, 4,217 tracebacks)."""
    server = await start_server(tiny_model_path, http_port=0)
    long_url = b"GET /" + b"a" * 16_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    long_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"b" * 16_000 + b"\r\n\r\n"
    bad_line = b"NOT HTTP AT ALL\r\n\r\n"
    with caplog.at_level(logging.WARNING):
        for request in (long_url, long_header, bad_line, long_url):
            head, body = await raw_reply(server.http.port, request)
            assert head.split()[1] == "400", head
            assert "\r\nServer: digit-recognizer" in head and "aiohttp" not in head, head
            assert "application/json" in head, head
            assert json.loads(body)["error"].startswith("malformed HTTP request: "), body
    warnings = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING], caplog.text  # throttled to one
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


# Item 6: names callers send, echoed.


async def test_a_megabyte_name_is_echoed_cut(start_server, tiny_model_path):
    """A 1 MB model name made a 1 MB NOT_FOUND message; gRPC clients refuse trailers past
    16 KB and reported RESOURCE_EXHAUSTED. Every front's message is now at most 1 KB."""
    from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
    from digit_recognizer.protos import inference_pb2 as oip
    from digit_recognizer.protos import inference_pb2_grpc as oip_grpc
    from digit_recognizer.server.errors import MAX_MESSAGE_BYTES

    server = await start_server(tiny_model_path, http_port=0)
    image = one_hot_image(2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        digits = digits_pb2_grpc.DigitClassifierStub(channel)
        triton = oip_grpc.GRPCInferenceServiceStub(channel)
        for big in ("m" * 1_000_000, "\U0001f600" * 300_000):  # 4 bytes a character, too
            calls = [
                digits.Classify(digits_pb2.ClassifyRequest(pixels=image, model=big)),
                digits.Classify(digits_pb2.ClassifyRequest(pixels=image, model_version=big)),
                triton.ModelInfer(oip.ModelInferRequest(model_name=big)),
                triton.ModelMetadata(oip.ModelMetadataRequest(name=big)),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
                message = info.value.details()
                assert len(message.encode()) <= MAX_MESSAGE_BYTES, len(message.encode())
                assert len(message) < 512, len(message)  # the name itself cut at 256
                assert "characters in all]" in message, message  # errors.cut marker
                assert message.endswith("this server serves 'tiny' version '1'"), message
        stream = digits.ClassifyStream()
        await stream.write(digits_pb2.ClassifyRequest(pixels=image, model="m" * 1_000_000))
        reply = await asyncio.wait_for(stream.read(), timeout=10)
        await stream.done_writing()
        assert reply.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert len(reply.error.message.encode()) <= MAX_MESSAGE_BYTES
    import aiohttp

    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
        for path, status in ((f"/v2/models/{'q' * 8000}", 404), (f"/{'r' * 8000}", 404)):
            async with http.get(path) as reply:
                assert reply.status == status
                assert len((await reply.json())["error"]) <= MAX_MESSAGE_BYTES
        named = {"name": "n" * 50_000, "datatype": "FP32", "shape": [1, 784], "data": [0] * 784}
        async with http.post(INFER, json={"inputs": [named]}) as reply:
            error = (await reply.json())["error"]
            assert reply.status == 400 and len(error) <= MAX_MESSAGE_BYTES, len(error)
            assert "characters left out]" in error, error


def test_names_are_cut_with_a_marker():
    from digit_recognizer.server.errors import bounded, cut

    assert cut("a" * 256) == "a" * 256
    assert cut("a" * 300) == "a" * 256 + "…[300 characters in all]"
    message = "x" * 5000 + " the end"
    shown = bounded(message)
    assert len(shown.encode()) <= 1024 and shown.endswith(" the end")
    assert "characters left out]…" in shown
    assert bounded("short") == "short"


# Item 7: one gRPC connection's share.


@pytest.mark.parametrize("limit", [None, 8])
async def test_one_connection_gets_at_most_its_share_of_streams(
    start_server, tiny_model_path, monkeypatch, limit
):
    """One connection's calls in progress are work ahead of every other connection's on the
    event loop: 10,000 streams on one connection held another's calls 0.25-0.54 s when the
    server took 1,000 of them at once, 0.10-0.12 s at 256 (the issue's bound: 0.25 s)."""
    from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
    from digit_recognizer.server.config import ServerConfig
    from digit_recognizer.server.service import DigitClassifierService

    expected = limit or ServerConfig.max_streams_per_connection
    assert expected <= 256
    started: list[int] = []  # the streams whose handler the server started, by index
    serve = DigitClassifierService.ClassifyStream

    async def counted(self, requests, context):
        started.append(int(dict(context.invocation_metadata())["index"]))
        async for reply in serve(self, requests, context):
            yield reply

    monkeypatch.setattr(DigitClassifierService, "ClassifyStream", counted)
    overrides = {} if limit is None else {"max_streams_per_connection": limit}
    server = await start_server(tiny_model_path, **overrides)
    own = [("grpc.use_local_subchannel_pool", 1)]  # each channel its own connection
    greedy = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=own)
    other = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=own)
    try:
        stub = digits_pb2_grpc.DigitClassifierStub(greedy)
        streams = [
            stub.ClassifyStream(metadata=(("index", str(i)),)) for i in range(expected + 100)
        ]
        await until(lambda: len(started) >= expected, f"the server to start {expected}", 30)
        # The other connection is served while the greedy one holds its share.
        reply = await digits_pb2_grpc.DigitClassifierStub(other).Classify(
            digits_pb2.ClassifyRequest(pixels=one_hot_image(7)), timeout=10
        )
        assert reply.predictions[0].digit == 7
        # A round trip on the greedy connection (its frames arrive in order): every stream the
        # client sent has reached the server. The client holds the others back.
        first = streams[started[0]]
        await first.write(digits_pb2.ClassifyRequest(pixels=one_hot_image(6)))
        assert (await asyncio.wait_for(first.read(), timeout=10)).response.predictions[0].digit == 6
        assert len(started) == expected
        for stream in streams:
            stream.cancel()
    finally:
        await greedy.close()
        await other.close()


def test_the_limits_are_in_help_and_checked():
    from click.testing import CliRunner

    from digit_recognizer.server.cli import main
    from digit_recognizer.server.config import ServerConfig

    text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    for flag, default in (
        ("--http-header-timeout", "default: 10.0"),
        ("--http-max-connections", "default: 1000"),
        ("--max-streams-per-connection", "default: 256"),
    ):
        assert flag in text and default in text.split(flag, 1)[1].split(" --", 1)[0], flag
    config = ServerConfig(
        model=Path("/nonexistent/model.onnx"),
        http_header_timeout_s=0,
        http_max_connections=0,
        max_streams_per_connection=0,
    )
    problems = " ".join(config.validate())
    assert "--http-header-timeout must be > 0" in problems
    assert "--http-max-connections must be at least 1" in problems
    assert "--max-streams-per-connection must be at least 1" in problems
