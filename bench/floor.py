"""The transport floor: a bare grpc.aio server speaking digits.v1 that does no inference.

It parses each request and returns one fixed, fully populated reply (ten probabilities,
version, telemetry), so it pays what any Python gRPC server of these message types must pay
and nothing more. No server of ours can beat it; how close we come is the measure of our
own per-request overhead.

    python -m bench.floor --port 50052
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
from digit_recognizer.server.validation import max_message_bytes

PROBABILITIES = [0.001] * 7 + [0.991] + [0.001] * 2


def fixed_reply(images: int = 1) -> digits_pb2.ClassifyResponse:
    prediction = digits_pb2.Prediction(
        digit=7, label="7", confidence=0.991, probabilities=PROBABILITIES
    )
    return digits_pb2.ClassifyResponse(
        predictions=[prediction] * images,
        model_version="1",
        telemetry=digits_pb2.Telemetry(batch_size=1, batches=1, queue_us=1, compute_us=1),
    )


class FloorService(digits_pb2_grpc.DigitClassifierServicer):
    def __init__(self) -> None:
        self._replies: dict[int, digits_pb2.ClassifyResponse] = {}

    def _reply(self, request: digits_pb2.ClassifyRequest) -> digits_pb2.ClassifyResponse:
        # One reply per request size, so bulk requests get as many predictions as images.
        images = max(1, len(request.pixels_f32le) // 3136)
        if images not in self._replies:
            self._replies[images] = fixed_reply(images)
        return self._replies[images]

    async def Classify(
        self, request: digits_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ClassifyResponse:
        return self._reply(request)

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[digits_pb2.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[digits_pb2.ClassifyStreamResponse]:
        async for request in request_iterator:
            yield digits_pb2.ClassifyStreamResponse(
                request_id=request.request_id, response=self._reply(request)
            )


async def serve(host: str, port: int) -> None:
    limit = max_message_bytes(1024)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    digits_pb2_grpc.add_DigitClassifierServicer_to_server(FloorService(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"floor serving on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
