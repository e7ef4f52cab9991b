"""Where one single-image Classify spends this server's CPU, item by item, in-process.

Each item is the real code on a real server's objects (a started server on 127.0.0.1:0, the
given model), timed alone over many calls; the bench's load figures give what these items
must add up to: server CPU per request, ours (--workers 1) minus the floor's.

    python -m bench.costs --model models/model.onnx
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench import model_option
from bench.floor import fixed_reply
from digit_recognizer.protos import digits_pb2
from digit_recognizer.protos.contract import PIXELS_PER_IMAGE
from digit_recognizer.server import metrics, rpc
from digit_recognizer.server.app import start_server
from digit_recognizer.server.config import ServerConfig
from digit_recognizer.server.dataplane import Call
from digit_recognizer.server.service import DigitClassifierService, _response
from digit_recognizer.server.validation import parse_request

ROUNDS = 7


def per_call_us(work: Callable[[], Any], calls: int) -> float:
    """Median over ROUNDS of the mean microseconds per call."""
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(calls):
            work()
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(rounds)


async def per_await_us(work: Callable[[], Awaitable[Any]], calls: int) -> float:
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(calls):
            await work()
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(rounds)


async def measure(model: Path, calls: int) -> dict[str, float]:
    config = ServerConfig(model=model, host="127.0.0.1", port=0, metrics_port=None,
                          plaintext=True, reload_interval_s=0)  # fmt: skip
    running = await start_server(config)
    try:
        plane = running.plane
        service = DigitClassifierService(plane)
        served = plane.resolve()
        image = np.zeros((1, PIXELS_PER_IMAGE), np.float32)
        image[0, 300:310] = 1.0
        request = digits_pb2.ClassifyRequest(pixels_f32le=image.tobytes())
        wire = request.SerializeToString()
        lenient = rpc._lenient(digits_pb2.ClassifyRequest)
        pixels = parse_request(request, 1024, 10)
        result = await plane.classify(served, pixels, None)
        reply = _response(request, served, result)
        floor_reply = fixed_reply()
        model_run = served.model.predict
        session = served.model.small_session or served.model.session
        feeds = {served.model.input_name: pixels}
        outputs = [served.model.output_name]
        count, latency = metrics.request_series("Classify", "OK", served.name, served.version)

        async def trivial(call: Call) -> digits_pb2.ClassifyResponse:
            return reply

        def record() -> None:
            count.inc()
            latency.observe(0.001)

        costs = {
            "handler, whole (observed + _classify)": await per_await_us(
                lambda: plane.observed("Classify", service._classify, request, None), calls
            ),
            "observed wrapper + its metrics (trivial work)": await per_await_us(
                lambda: plane.observed("Classify", trivial), calls
            ),
            "  of which request metrics (counter + histogram)": per_call_us(record, calls),
            "choose + parse_request (validation)": per_call_us(
                lambda: (plane.choose(Call()), parse_request(request, 1024, 10)), calls
            ),
            "DataPlane.classify (accounting + batcher + model)": await per_await_us(
                lambda: plane.classify(served, pixels, None), calls
            ),
            "  Batcher.submit (inline run + batch metrics)": await per_await_us(
                lambda: served.batcher.submit(pixels), calls
            ),
            "    Model.predict": per_call_us(lambda: model_run(pixels), calls),
            "      InferenceSession.run alone (the session small runs take)": per_call_us(
                lambda: session.run(outputs, feeds), calls
            ),
            "_response (reply built)": per_call_us(
                lambda: _response(request, served, result), calls
            ),
            "request parse (lenient) minus plain": per_call_us(lambda: lenient(wire), calls)
            - per_call_us(lambda: digits_pb2.ClassifyRequest.FromString(wire), calls),
            "reply serialize, ours minus floor's": per_call_us(reply.SerializeToString, calls)
            - per_call_us(floor_reply.SerializeToString, calls),
        }
        costs["reply bytes, ours / floor's"] = len(reply.SerializeToString()) / len(
            floor_reply.SerializeToString()
        )
        return costs
    finally:
        await running.server.stop(0)
        await running.plane.close()


@click.command()
@model_option
@click.option("--calls", type=int, default=3000, show_default=True, help="calls per round")
@click.option("--json", "as_json", is_flag=True)
def main(model: Path, calls: int, as_json: bool) -> None:
    """Microseconds per single-image Classify, item by item (median of 7 rounds)."""
    costs = asyncio.run(measure(model, calls))
    if as_json:
        click.echo(json.dumps(costs))
        return
    for item, value in costs.items():
        click.echo(f"{value:8.1f}  {item}")


if __name__ == "__main__":
    main()
