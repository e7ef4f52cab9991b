"""Overload: far more callers than the server can serve. The queue stays bounded, the excess
is refused at once with RESOURCE_EXHAUSTED, every accepted request is answered correctly,
memory stays flat, and service is normal the moment the load drops."""

from __future__ import annotations

import asyncio
import json
import os
import time

import grpc
import numpy as np

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc

from onnx_models import one_hot_image, save, slow_model

CALLERS = 64
SECONDS = 4.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_overload_is_refused_fast_and_nothing_accepted_is_lost(processes, tmp_path):
    model = save(slow_model(width=6144), tmp_path / "slow.onnx")  # ~60 images/s
    server = processes(
        *("--model", str(model), "--max-batch-size", "2", "--max-queue-size", "8"),
        *("--max-model-bytes", "300000000"),  # ~170 MB: a slow model on purpose
        *("--max-images-per-request", "2", "--intra-op-threads", "1"),
    )
    port = server.wait_serving()
    pid = server.proc.pid
    accepted_ms: list[float] = []
    rejected_ms: list[float] = []
    other: list[str] = []
    rss = [rss_mb(pid)]

    async def caller(stub, digit: int, stop_at: float) -> None:
        request = digits_pb2.ClassifyRequest(
            pixels_u8=(one_hot_image(digit) * 255).astype(np.uint8).tobytes()
        )
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            try:
                reply = await stub.Classify(request, timeout=30)
                assert reply.predictions[0].digit == digit  # answered, and answered right
                accepted_ms.append((time.monotonic() - sent) * 1000)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejected_ms.append((time.monotonic() - sent) * 1000)
                else:
                    other.append(exc.code().name)

    async def sample_memory(stop_at: float) -> None:
        while time.monotonic() < stop_at:
            rss.append(rss_mb(pid))
            await asyncio.sleep(0.1)

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(8)]
    try:
        stubs = [digits_pb2_grpc.DigitClassifierStub(c) for c in channels]
        stop_at = time.monotonic() + SECONDS
        await asyncio.gather(
            sample_memory(stop_at),
            *(caller(stubs[i % 8], i % 10, stop_at) for i in range(CALLERS)),
        )
        # Load gone: the very next requests are served normally.
        recovery = []
        for digit in range(10):
            sent = time.monotonic()
            reply = await stubs[0].Classify(
                digits_pb2.ClassifyRequest(pixels=one_hot_image(digit)), timeout=5
            )
            recovery.append((time.monotonic() - sent) * 1000)
            assert reply.predictions[0].digit == digit
    finally:
        for chan in channels:
            await chan.close()
    figures = {
        "callers": CALLERS,
        "seconds": SECONDS,
        "accepted": len(accepted_ms),
        "rejected": len(rejected_ms),
        "rejection_p50_ms": float(np.percentile(rejected_ms, 50)) if rejected_ms else None,
        "rejection_p99_ms": float(np.percentile(rejected_ms, 99)) if rejected_ms else None,
        "accepted_p50_ms": float(np.percentile(accepted_ms, 50)) if accepted_ms else None,
        "accepted_p99_ms": float(np.percentile(accepted_ms, 99)) if accepted_ms else None,
        "rss_start_mb": rss[0],
        "rss_max_mb": max(rss),
        "recovery_max_ms": max(recovery),
    }
    print("OVERLOAD", json.dumps(figures))
    (tmp_path / "overload.json").write_text(json.dumps(figures))
    assert not other, other[:5]
    assert figures["rejected"] > figures["accepted"] > 0  # really overloaded, still serving
    # Refused without queueing: faster than being served, whatever else the machine is doing.
    assert figures["rejection_p50_ms"] < figures["accepted_p50_ms"]
    # The p99 of a refusal beats the median of a service (a 30x slower refusal would not).
    assert figures["rejection_p99_ms"] < figures["accepted_p50_ms"]
    # Memory stays flat: +4.2-4.7 MB measured over 6,000+ refusals (3 runs, 2 cores). 10 MB
    # is twice that for allocator noise; a leak of 1 KB per refused call (+6 MB) exceeds it.
    assert figures["rss_max_mb"] - figures["rss_start_mb"] < 10
    assert figures["recovery_max_ms"] < 1000
    assert os.path.exists(f"/proc/{pid}")  # still alive
