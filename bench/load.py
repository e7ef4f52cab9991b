"""One load-generating process: closed-loop callers on grpc.aio (or aiohttp for the REST
calls), timings out as one JSON line.

The orchestrator starts several of these at once (`--start-at`, a shared wall-clock instant) so
the load generator is never one Python process competing with the server it measures. Requests
are serialized once up front and replies are kept as bytes; only a sample is parsed afterwards
(correctness and the server's batching telemetry), so the per-call client cost is gRPC's own.

    python -m bench.load --target 127.0.0.1:50051 --call classify --images 1 --concurrency 32

`--call client` is the other kind of caller: the project's own `AsyncDigitClient`, its
`classify()` per call (pixels checked and encoded, the reply decoded, as a program using the
library pays), over its pool of connections (one to each server process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from digit_recognizer.client.errors import DigitClientError
from digit_recognizer.client.images import quantized
from digit_recognizer.protos import digits_pb2, inference_pb2

CALLS = ("classify", "stream", "infer", "rest", "rest-binary", "client")
UNARY_METHODS = {
    "classify": "/digits.v1.DigitClassifier/Classify",
    "infer": "/inference.GRPCInferenceService/ModelInfer",
}
# POST /v2/models/{m}/infer: JSON tensors, or Triton's binary tensor data (a JSON header of
# this length, then the raw little-endian tensor; the reply likewise).
REST_CALLS = ("rest", "rest-binary")
INFERENCE_HEADER = "Inference-Header-Content-Length"
SAMPLE_EVERY = 16  # replies kept for parsing: one in this many
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Load:
    target: str
    # classify | stream (digits.v1) | infer (Open Inference Protocol ModelInfer) | rest |
    # rest-binary (the same protocol's REST infer, JSON or binary tensors; target: HTTP)
    call: str
    images: int  # per request
    concurrency: int  # callers in this process
    warmup_s: float
    duration_s: float
    start_at: float  # time.time() at which every process starts calling
    samples: str  # .npz with `images` (N, 784) float32 and `expected` digits (N,)
    model_name: str = ""
    check: bool = True  # parse a sample of replies and compare them with `expected`
    input_name: str = "pixels"
    output_name: str = "probabilities"
    encoding: str = "f32"  # f32 | u8
    # TCP connections, callers spread over them. --workers N servers share a port through
    # SO_REUSEPORT, which spreads connections, not calls: one connection reaches one worker.
    connections: int = 1


def sample_images(samples: str, count: int) -> tuple[np.ndarray, list[int]]:
    """The first `count` images of the orchestrator's samples file and the digits the model
    gives them in-process, so every checked reply can be marked right or wrong."""
    with np.load(samples) as data:
        images, labels = data["images"], data["expected"]
    if len(images) < count:
        raise SystemExit(f"{samples} holds {len(images)} images; {count} are needed")
    return images[:count].astype(np.float32), labels[:count].tolist()


def build_rest_request(load: Load, images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The REST infer body and its headers (FP32 or UINT8 pixels, only `output_name` asked for:
    in JSON, or binary for rest-binary)."""
    u8 = load.encoding == "u8"
    values = quantized(images) if u8 else images.astype("<f4")
    tensor = {"name": load.input_name, "datatype": "UINT8" if u8 else "FP32",
              "shape": list(images.shape)}  # fmt: skip
    if load.call == "rest":
        body = {"inputs": [{**tensor, "data": values.ravel().tolist()}],
                "outputs": [{"name": load.output_name}]}  # fmt: skip
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    raw = values.tobytes()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": load.output_name, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + raw, {
        "Content-Type": "application/octet-stream",
        INFERENCE_HEADER: str(len(header)),
    }


def build_request(load: Load, images: np.ndarray) -> bytes:
    if load.call in REST_CALLS:
        return build_rest_request(load, images)[0]
    u8 = load.encoding == "u8"  # the samples are MNIST's own 8-bit values / 255: exact
    raw = quantized(images).tobytes() if u8 else images.astype("<f4").tobytes()
    if load.call == "infer":
        request = inference_pb2.ModelInferRequest(
            model_name=load.model_name,
            inputs=[
                inference_pb2.ModelInferRequest.InferInputTensor(
                    name=load.input_name,
                    datatype="UINT8" if u8 else "FP32",
                    shape=list(images.shape),
                )
            ],
            outputs=[
                inference_pb2.ModelInferRequest.InferRequestedOutputTensor(name=load.output_name)
            ],
            raw_input_contents=[raw],
        )
    elif u8:
        request = digits_pb2.ClassifyRequest(pixels_u8=raw)
    else:
        request = digits_pb2.ClassifyRequest(pixels_f32le=raw)
    return request.SerializeToString()


def predicted_digits(load: Load, reply: Any) -> tuple[list[int], int | None]:
    """The digits in a reply and, for digits.v1, the executed batch size it reports."""
    if load.call == "client":  # a Prediction
        return [reply.digit], reply.telemetry.batch_size
    if load.call == "rest":
        (output,) = json.loads(reply)["outputs"]
        return np.asarray(output["data"]).reshape(-1, 10).argmax(axis=1).tolist(), None
    if load.call == "rest-binary":  # the one output asked for ends the reply: N x 10 FP32
        probabilities = np.frombuffer(reply[-load.images * 10 * 4 :], dtype="<f4")
        return probabilities.reshape(-1, 10).argmax(axis=1).tolist(), None
    if load.call == "infer":
        response = inference_pb2.ModelInferResponse.FromString(reply)
        if response.raw_output_contents:
            probabilities = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
        else:
            probabilities = np.asarray(response.outputs[0].contents.fp32_contents, np.float32)
        return probabilities.reshape(-1, 10).argmax(axis=1).tolist(), None
    response = digits_response(load, reply)
    return [p.digit for p in response.predictions], response.telemetry.batch_size


def digits_response(load: Load, reply: bytes) -> digits_pb2.ClassifyResponse:
    if load.call == "stream":
        stream_reply = digits_pb2.ClassifyStreamResponse.FromString(reply)
        if stream_reply.HasField("error"):
            raise RuntimeError(f"stream error {stream_reply.error.message}")
        return stream_reply.response
    return digits_pb2.ClassifyResponse.FromString(reply)


def answering_worker(load: Load, reply: Any) -> int | None:
    """The server process that answered (digits.v1 replies say; other protocols do not)."""
    if load.call == "client":
        return reply.telemetry.worker
    if load.call in ("classify", "stream"):
        return digits_response(load, reply).telemetry.worker
    return None


Call = Callable[[], Awaitable[bytes]]


def open_caller(load: Load, channel: grpc.aio.Channel, request: bytes) -> Call:
    """A coroutine function making one request; bytes in, bytes out (no codec on the clock)."""
    if load.call in UNARY_METHODS:
        unary = channel.unary_unary(UNARY_METHODS[load.call])
        return lambda: unary(request)
    # One bidirectional stream per caller, ping-pong: the same closed loop as unary calls.
    stream = channel.stream_stream("/digits.v1.DigitClassifier/ClassifyStream")()

    async def exchange() -> bytes:
        await stream.write(request)
        reply = await stream.read()
        if reply is grpc.aio.EOF:
            raise RuntimeError("the stream ended")
        return reply

    return exchange


class HttpError(Exception):
    """A REST reply other than 200: counted by status, like a gRPC code."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.code = f"HTTP_{status}"


def open_rest_caller(load: Load, session: Any, images: np.ndarray) -> Call:
    body, headers = build_rest_request(load, images)
    url = f"http://{load.target}/v2/models/{load.model_name}/infer"

    async def post() -> bytes:
        async with session.post(url, data=body, headers=headers) as reply:
            data = await reply.read()
            if reply.status != 200:
                raise HttpError(reply.status)
            return data

    return post


def open_client_caller(client: Any, images: np.ndarray) -> Call:
    pixels = quantized(images)  # 8-bit, as pictures are and as the library sends them
    return lambda: client.classify(pixels[0])


async def run(load: Load) -> dict:
    images, labels = sample_images(load.samples, load.images)
    request = build_request(load, images) if load.call != "client" else b""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    latencies: list[float] = []
    samples: list[bytes] = []
    errors: dict[str, int] = {}
    if load.connections > 1:  # each channel its own TCP connection, not a shared subchannel
        options.append(("grpc.use_local_subchannel_pool", 1))
    async with contextlib.AsyncExitStack() as stack:
        if load.call in REST_CALLS:  # HTTP/1.1: one keep-alive connection per caller
            import aiohttp

            session = await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=load.concurrency))
            )
            callers = [open_rest_caller(load, session, images) for _ in range(load.concurrency)]
        elif load.call == "client":
            from digit_recognizer.client.client import AsyncDigitClient

            client = await stack.enter_async_context(
                AsyncDigitClient(load.target, connections=load.connections or "auto")
            )
            await client.connect()
            callers = [open_client_caller(client, images) for _ in range(load.concurrency)]
        else:
            channels = [
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(load.target, options=options)
                )
                for _ in range(max(1, min(load.connections, load.concurrency)))
            ]
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 30)
            callers = [
                open_caller(load, channels[i % len(channels)], request)
                for i in range(load.concurrency)
            ]
        await asyncio.sleep(max(0.0, load.start_at - time.time()))
        measure_from = time.perf_counter() + load.warmup_s
        stop_at = measure_from + load.duration_s
        cpu_at_start: list[float] = []

        async def caller(call: Call) -> None:
            count = 0
            while (started := time.perf_counter()) < stop_at:
                try:
                    reply = await call()
                except (grpc.aio.AioRpcError, HttpError, DigitClientError) as exc:
                    code = _code(exc)
                    if started >= measure_from:
                        errors[code] = errors.get(code, 0) + 1
                    await asyncio.sleep(0.001)  # an erroring server must not become a spin
                    continue
                finished = time.perf_counter()
                if measure_from <= started and finished <= stop_at:
                    latencies.append(finished - started)
                    count += 1
                    if load.check and (load.call == "client" or count % SAMPLE_EVERY == 1):
                        samples.append(reply)

        async def mark_cpu() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            cpu_at_start.append(_cpu_s())

        tasks = [asyncio.create_task(caller(call)) for call in callers]
        marker = asyncio.create_task(mark_cpu())
        await asyncio.gather(*tasks)
        await marker
        cpu_s = _cpu_s() - cpu_at_start[0]
    wrong = 0
    batch_sizes: list[int] = []
    workers: dict[str, int] = {}  # replies per server process, of the sample
    for reply in samples:
        digits, batch_size = predicted_digits(load, reply)
        wrong += sum(d != want for d, want in zip(digits, labels, strict=True))
        if batch_size is not None:
            batch_sizes.append(batch_size)
        if (worker := answering_worker(load, reply)) is not None:
            workers[str(worker)] = workers.get(str(worker), 0) + 1
    return {
        "latencies_s": latencies,
        "errors": errors,
        "checked_replies": len(samples),
        "wrong_digits": wrong,
        "batch_sizes": batch_sizes,
        "sampled_workers": workers,
        "cpu_s": cpu_s,
        "duration_s": load.duration_s,
    }


def _code(exc: Exception) -> str:
    if isinstance(exc, HttpError):
        return exc.code
    if isinstance(exc, DigitClientError):
        return type(exc).__name__
    return exc.code().name


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT (HTTP for the rest calls)")
    parser.add_argument("--call", choices=CALLS, default="classify")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--concurrency", type=int, default=1, help="callers in this process")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not measured")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() to start")
    parser.add_argument("--samples", required=True, help=".npz: images, expected digits")
    parser.add_argument("--model-name", default="", help="for --call infer")
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="do not compare replies with the expected digits",
    )
    parser.add_argument("--input-name", default="pixels")
    parser.add_argument("--output-name", default="probabilities")
    parser.add_argument("--encoding", choices=("f32", "u8"), default="f32")
    parser.add_argument(
        "--connections", type=int, default=1, help="TCP connections (client: 0 = auto)"
    )
    args = parser.parse_args(argv)
    load = Load(
        target=args.target,
        call=args.call,
        images=args.images,
        concurrency=args.concurrency,
        warmup_s=args.warmup,
        duration_s=args.duration,
        start_at=args.start_at or time.time(),
        samples=args.samples,
        model_name=args.model_name,
        check=args.check,
        input_name=args.input_name,
        output_name=args.output_name,
        encoding=args.encoding,
        connections=args.connections,
    )
    json.dump(asyncio.run(run(load)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
