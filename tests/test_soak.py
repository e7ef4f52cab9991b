"""Opt-in soak (`make soak`, 10 minutes): ~70% of measured capacity, open loop. No error may
occur and the server's RSS must stay flat. DIGITS_SOAK_SECONDS shortens or lengthens it."""

from __future__ import annotations

import asyncio
import json
import os
import time

import grpc
import numpy as np
import pytest

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc

from onnx_models import one_hot_image
from test_overload import rss_mb

SOAK_SECONDS = float(os.environ.get("DIGITS_SOAK_SECONDS", "600"))
pytestmark = pytest.mark.skipif(
    os.environ.get("DIGITS_SOAK") != "1", reason="opt-in: make soak (DIGITS_SOAK=1)"
)


@pytest.mark.timeout(SOAK_SECONDS + 300)
async def test_soak_at_70_percent_of_capacity(processes, trained_model):
    server = processes("--model", str(trained_model))
    port = server.wait_serving()
    pid = server.proc.pid
    request = digits_pb2.ClassifyRequest(
        pixels_u8=(np.stack([one_hot_image(d) for d in range(8)]) * 255).astype(np.uint8).tobytes()
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        stub = digits_pb2_grpc.DigitClassifierStub(chan)

        async def closed_loop(stop_at: float, done: list[int]) -> None:
            while time.monotonic() < stop_at:
                await stub.Classify(request, timeout=10)
                done.append(1)

        done: list[int] = []
        stop_at = time.monotonic() + 5
        await asyncio.gather(*(closed_loop(stop_at, done) for _ in range(32)))
        rate = 0.7 * len(done) / 5
        errors: list[str] = []
        latencies: list[float] = []
        rss = [(0.0, rss_mb(pid))]
        in_flight: set[asyncio.Task[None]] = set()

        async def one() -> None:
            sent = time.monotonic()
            try:
                await stub.Classify(request, timeout=10)
                latencies.append(time.monotonic() - sent)
            except grpc.aio.AioRpcError as exc:
                errors.append(exc.code().name)

        started = time.monotonic()
        sent = 0
        next_sample = started + 10
        while (now := time.monotonic()) < started + SOAK_SECONDS:
            due = int((now - started) * rate)
            for _ in range(due - sent):
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            sent = max(sent, due)
            if now >= next_sample:
                rss.append((now - started, rss_mb(pid)))
                next_sample += 10
            await asyncio.sleep(0.002)
        await asyncio.gather(*in_flight)
    ms = np.array(latencies) * 1000
    report = {
        "seconds": SOAK_SECONDS,
        "rate_per_s": rate,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rss_start_mb": rss[1][1] if len(rss) > 1 else rss[0][1],
        "rss_end_mb": rss[-1][1],
    }
    print("SOAK", json.dumps(report))
    assert not errors, errors[:5]
    assert report["rss_end_mb"] - report["rss_start_mb"] < 20
