"""The client library and `digit-client` against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from digit_recognizer.client import client as client_module
from digit_recognizer.client.cli import main
from digit_recognizer.client.client import AsyncDigitClient, DigitClient, as_pixels, encode
from digit_recognizer.client.errors import (
    DeadlineExceeded,
    DigitClientError,
    InvalidInput,
    Unavailable,
)

from onnx_models import CARD, one_hot_image, save, tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `digit-server` process with the tiny model, shared by the synchronous tests."""
    from processes import ServerProcess

    model = save(tiny_model(), tmp_path_factory.mktemp("served") / "tiny.onnx")
    server = ServerProcess("--model", str(model), "--max-images-per-request", "8")
    port = server.wait_serving()
    yield f"127.0.0.1:{port}"
    server.kill()


def test_as_pixels_accepts_every_documented_shape_and_dtype():
    one = one_hot_image(3)
    assert as_pixels(one).shape == (1, 784)
    assert as_pixels(one.reshape(28, 28)).shape == (1, 784)
    assert as_pixels(np.stack([one] * 5)).shape == (5, 784)
    assert as_pixels(np.stack([one] * 5).reshape(5, 28, 28)).shape == (5, 784)
    assert as_pixels((one * 255).astype(np.uint8)).dtype == np.uint8
    assert as_pixels(np.zeros(784, np.int64)).dtype == np.uint8
    assert as_pixels(one.astype(np.float64)).dtype == np.float32


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros(783), r"got shape \(783,\)"),
        (np.zeros((2, 27, 28)), r"got shape \(2, 27, 28\)"),
        (np.full(784, 2.0), "image 0, pixel 0 is 2.0; float pixels must be in"),
        (np.full(784, np.nan), "is nan"),
        (np.full(784, 300), "integer pixels must be in 0-255"),
        (np.array([]), "got float64 \\(0,\\)"),
        (np.zeros(784, bool), "got dtype bool"),
    ],
)
def test_as_pixels_says_what_is_wrong(value, message):
    with pytest.raises(InvalidInput, match=message):
        as_pixels(value)


def test_sync_client_classify_many_chunks_to_the_server_limit(served):
    digits = [i % 10 for i in range(30)]
    with DigitClient(served) as client:
        assert client.health() == "SERVING"
        assert client.model_info().batching.max_images_per_request == 8
        predictions = client.classify_many(np.stack([one_hot_image(d) for d in digits]))
        assert [p.digit for p in predictions] == digits
        single = client.classify(one_hot_image(6), top_k=2)
        assert single.digit == 6 and single.top[0].digit == 6 and len(single.top) == 2
        assert single.model_version == "1" and single.telemetry.batches == 1
        uint8 = client.classify((one_hot_image(2) * 255).astype(np.uint8))
        assert uint8.digit == 2


def test_sync_client_stream_reports_errors_per_message(served):
    with DigitClient(served) as client:
        batches = [one_hot_image(1), np.stack([one_hot_image(2)] * 9), one_hot_image(3)]
        results = dict(client.stream(batches))
    assert results["0"][0].digit == 1 and results["2"][0].digit == 3
    assert isinstance(results["1"], InvalidInput) and "at most 8" in str(results["1"])


def test_server_side_errors_become_typed_exceptions(served):
    with DigitClient(served) as client:
        with pytest.raises(InvalidInput, match="at most 8 are allowed"):
            client._call(client_module.encode(as_pixels(np.zeros((9, 784)))))
        with pytest.raises(InvalidInput, match="classify takes one image, got 2"):
            client.classify(np.zeros((2, 784)))


def test_invalid_input_carries_the_servers_field_violations(served):
    """The server's google.rpc.BadRequest (rich status details) arrives on InvalidInput."""
    from digit_recognizer.protos import digits_pb2

    pixels = np.zeros((2, 784), np.float32)
    pixels[1, 5] = 2.0
    out_of_range = digits_pb2.ClassifyRequest(pixels_f32le=pixels.tobytes())
    with DigitClient(served) as client:
        with pytest.raises(InvalidInput, match="image 1, pixel 5") as info:
            client._call(out_of_range)
        ((field, description),) = info.value.field_violations
        assert field == "pixels_f32le[789]" and "image 1, pixel 5" in description
        assert info.value.field_violations[0].field == field
        with pytest.raises(InvalidInput) as info:
            client._call(encode(as_pixels(np.zeros((9, 784)))))
        assert [v.field for v in info.value.field_violations] == ["pixels_f32le"]
        with pytest.raises(InvalidInput) as local:  # found here, before sending: none
            client.classify(np.zeros((2, 784)))
        assert local.value.field_violations == []


async def test_async_invalid_input_carries_the_field_violations_too(served):
    from digit_recognizer.protos import digits_pb2

    broken = digits_pb2.ClassifyRequest(pixels_f32le=b"\0" * 7)
    async with AsyncDigitClient(served) as client:
        with pytest.raises(InvalidInput) as info:
            await client._call(broken)
    (violation,) = info.value.field_violations
    assert violation.field == "pixels_f32le" and "not a multiple of 4" in violation.description


def test_a_call_slower_than_its_timeout_is_deadline_exceeded(processes, tmp_path):
    from onnx_models import slow_model

    model = save(slow_model(width=6144), tmp_path / "slow.onnx")  # ~0.5 s for 256 images
    # ~170 MB of weights: over the default --max-model-bytes, on purpose here.
    args = ["--model", str(model), "--max-batch-size", "256", "--max-model-bytes", "300000000"]
    port = processes(*args).wait_serving()
    images = np.stack([one_hot_image(i % 10) for i in range(256)])
    hurried = DigitClient(f"127.0.0.1:{port}", timeout=0.05)
    with hurried, pytest.raises(DeadlineExceeded):
        hurried.classify_many(images)


def test_nothing_listening_is_unavailable_after_grpc_retries():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = DigitClient(f"127.0.0.1:{port}", timeout=5)
    with client, pytest.raises(Unavailable, match=f"127.0.0.1:{port}") as info:
        client.classify(one_hot_image(1))
    assert isinstance(info.value, DigitClientError) and info.value.__cause__ is None


async def test_async_client(start_server, tiny_model_path):
    server = await start_server(tiny_model_path, max_images_per_request=4)
    async with AsyncDigitClient(f"127.0.0.1:{server.port}") as client:
        assert await client.health() == "SERVING"
        digits = [i % 10 for i in range(11)]
        predictions = await client.classify_many(np.stack([one_hot_image(d) for d in digits]))
        assert [p.digit for p in predictions] == digits
        assert (await client.classify(one_hot_image(9))).digit == 9
        picture = Image.fromarray((one_hot_image(5).reshape(28, 28) * 255).astype(np.uint8))
        assert (await client.classify_image(picture)).digit == 5
        replies = dict([item async for item in client.stream([one_hot_image(7), np.zeros(3)])])
        assert replies["0"][0].digit == 7
        assert isinstance(replies["1"], InvalidInput) and "got shape (3,)" in str(replies["1"])
        with pytest.raises(InvalidInput):
            await client.classify(np.full(784, 3.0))


async def test_round_robin_spreads_calls_over_every_server(start_server, tmp_path):
    from dataclasses import replace

    ports = []
    for version in ("1", "2"):
        model = save(tiny_model(replace(CARD, version=version)), tmp_path / f"v{version}.onnx")
        ports.append((await start_server(model)).port)
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    async with AsyncDigitClient(target) as client:
        # Connected: each replica becomes eligible once its health Watch says SERVING.
        for _ in range(500):  # bounded
            warm = {(await client.classify(one_hot_image(1))).model_version for _ in range(4)}
            if warm == {"1", "2"}:
                break
        replies = await asyncio.gather(*(client.classify(one_hot_image(1)) for _ in range(20)))
    versions = [r.model_version for r in replies]
    assert set(versions) == {"1", "2"} and abs(versions.count("1") - 10) <= 2


def run(*args: str, input: bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def test_cli_classifies_files_directories_and_stdin(served):
    examples = sorted((REPO / "examples").iterdir())
    result = run("classify", "--target", served, *map(str, examples[:3]))
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{examples[0]}: ")
    directory = run("classify", "--target", served, str(REPO / "examples"))
    answered = directory.output.strip().splitlines()
    assert directory.exit_code == 0 and len(answered) == len(examples)
    assert sorted(line.split(": ")[0] for line in answered) == sorted(map(str, examples))
    assert all(line.split(": ")[1][0].isdigit() for line in answered)  # "7 (0.998)"
    piped = run("classify", "--target", served, "-", input=examples[0].read_bytes())
    assert piped.exit_code == 0 and piped.output.startswith("-: ")


def test_cli_json_schema(served, tmp_path):
    picture = tmp_path / "four.png"
    Image.fromarray((one_hot_image(4).reshape(28, 28) * 255).astype(np.uint8)).save(picture)
    result = run("classify", "--target", served, "--json", "--top-k", "3", str(picture))
    record = json.loads(result.output)
    assert record["path"] == str(picture) and record["digit"] == 4 and record["label"] == "4"
    assert len(record["probabilities"]) == 10 and 0 <= record["confidence"] <= 1
    assert record["top"][0]["digit"] == 4 and len(record["top"]) == 3


def test_cli_bad_pictures_exit_1_and_good_ones_still_print(served, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = REPO / "examples" / "mnist-0-label7.png"
    result = CliRunner().invoke(main, ["classify", "--target", served, str(bad), str(good)])
    assert result.exit_code == 1
    assert f"Error: {bad}: not an image Pillow can read" in result.stderr
    assert result.stdout.startswith(f"{good}: ") and "Traceback" not in result.output


def test_cli_show_draws_the_model_input(served):
    good = str(REPO / "examples" / "mnist-0-label7.png")
    piped = run("classify", "--target", served, "--show", good)  # not a terminal: plain text
    picture, answer = piped.stdout.splitlines()[:28], piped.stdout.splitlines()[28]
    assert all(len(row) == 28 and row.isascii() for row in picture) and "\x1b" not in piped.stdout
    assert sum(row.count("@") for row in picture) > 20 and answer.startswith(f"{good}: ")
    as_json = run("classify", "--target", served, "--show", "--json", good)
    assert [json.loads(line)["path"] for line in as_json.stdout.splitlines()] == [good]
    assert len(as_json.stderr.splitlines()) == 28  # the picture, beside the JSON


def test_show_draws_half_blocks_for_a_terminal():
    from digit_recognizer.client.images import render

    assert "".join(render(one_hot_image(3))).count("▀") == 28 * 14


def test_cli_info_health_and_bench(served):
    info = json.loads(run("info", "--target", served, "--json").output)
    assert info["name"] == "tiny" and info["execution_provider"] == "CPUExecutionProvider"
    table = run("info", "--target", served).output
    assert "tiny" in table and "…" not in table
    assert info["file_sha256"] in "".join(table.split()).replace("│", "")  # folded, never cut
    health = run("health", "--target", served)
    assert (health.exit_code, health.output.strip()) == (0, "SERVING")
    bench = run("bench", "--target", served, "--count", "50", "--concurrency", "4", "--json")
    result = json.loads(bench.output)
    assert result["requests"] == 50 and not result["errors"] and result["p99_ms"] > 0
    v2 = run("bench", "--target", served, "--count", "20", "--protocol", "v2", "--json")
    assert json.loads(v2.output)["requests"] == 20 and not json.loads(v2.output)["errors"]
    text = run("bench", "--target", served, "--duration", "0.5", "--batch-size", "8")
    assert text.output.startswith(("1", "2", "3", "4", "5", "6", "7", "8", "9"))  # no blank line
    assert "requests/s" in text.output and "p99" in text.output
    failing = run("bench", "--target", served, "--count", "5", "--batch-size", "5000")
    assert failing.exit_code == 1 and "errors:" in failing.output  # too many images per call


def test_cli_connection_options_go_before_or_after_the_subcommand(served):
    before = run("--target", served, "info", "--json")
    assert before.exit_code == 0 and json.loads(before.output)["name"] == "tiny"
    after_wins = run("--target", "127.0.0.1:1", "health", "--target", served)
    assert (after_wins.exit_code, after_wins.output.strip()) == (0, "SERVING")


def test_cli_unreachable_server_is_one_error_line():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(main, ["health", "--target", f"127.0.0.1:{port}", "--timeout", "2"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1


async def _scripted_server(codes: list[grpc.StatusCode]):
    """A real digits.v1 server on 127.0.0.1 that answers Classify with `codes` in turn (OK
    once they run out) and counts the calls it received."""
    from digit_recognizer.protos import digits_pb2, digits_pb2_grpc

    received = []

    class Scripted(digits_pb2_grpc.DigitClassifierServicer):
        async def Classify(self, request, context):
            received.append(request)
            if len(received) <= len(codes):
                await context.abort(codes[len(received) - 1], "scripted")
            return digits_pb2.ClassifyResponse(
                predictions=[{"digit": 4, "label": "4", "confidence": 1.0,
                              "probabilities": [0.0] * 4 + [1.0] + [0.0] * 5}]
            )  # fmt: skip

    server = grpc.aio.server()
    digits_pb2_grpc.add_DigitClassifierServicer_to_server(Scripted(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, received


async def test_the_retry_policy_retries_unavailable_and_never_resource_exhausted():
    from digit_recognizer.client.errors import Overloaded, ServerError

    server, port, received = await _scripted_server([grpc.StatusCode.UNAVAILABLE] * 2)
    async with AsyncDigitClient(
        f"127.0.0.1:{port}", options=[("grpc.inhibit_health_checking", 1)]
    ) as client:
        assert (await client.classify(one_hot_image(4))).digit == 4
    assert len(received) == 3  # two UNAVAILABLE, retried by the channel itself
    await server.stop(0)

    server, port, received = await _scripted_server([grpc.StatusCode.RESOURCE_EXHAUSTED])
    async with AsyncDigitClient(
        f"127.0.0.1:{port}", options=[("grpc.inhibit_health_checking", 1)]
    ) as client:
        with pytest.raises(Overloaded, match="scripted"):
            await client.classify(one_hot_image(4))
    assert len(received) == 1  # never retried at once: that is what makes overloads worse
    await server.stop(0)

    server, port, received = await _scripted_server([grpc.StatusCode.INTERNAL])
    async with AsyncDigitClient(
        f"127.0.0.1:{port}", options=[("grpc.inhibit_health_checking", 1)]
    ) as client:
        with pytest.raises(ServerError):
            await client.classify(one_hot_image(4))
    await server.stop(0)


def test_cli_sends_pictures_as_uint8(served, monkeypatch):
    """8-bit pictures go over the wire as pixels_u8: a quarter of float32's bytes."""
    sent = []
    real = DigitClient.classify_many

    def spy(self, images, **kwargs):
        sent.append(encode(as_pixels(images)))
        return real(self, images, **kwargs)

    monkeypatch.setattr(DigitClient, "classify_many", spy)
    result = run("classify", "--target", served, str(REPO / "examples" / "mnist-0-label7.png"))
    assert result.exit_code == 0, result.output
    (request,) = sent
    assert len(request.pixels_u8) == 784 and not request.pixels_f32le and not request.pixels


def test_a_negative_top_k_is_invalid_input_not_a_protobuf_error():
    from digit_recognizer.client.client import encode
    from digit_recognizer.client.errors import InvalidInput

    with pytest.raises(InvalidInput, match="top_k must be a whole number >= 0, got -1"):
        encode(np.zeros((1, 784), np.float32), top_k=-1)
