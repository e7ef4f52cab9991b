"""Calls under load while a replica restarts: `python scripts/restart_under_load.py --seconds 8
--restart-after 2 --command 'docker restart X' HOST:PORT HOST:PORT` -> one JSON line with the
outcomes of every call, for a plain grpc.aio round_robin channel (no retry policy, no health
checking: another team's client) and for DigitClient, side by side. Used by the Docker smoke
test; any target list works."""

from __future__ import annotations

import asyncio
import collections
import json
import shlex
import subprocess
import time

import click
import grpc
import numpy as np

from digit_recognizer.client.client import AsyncDigitClient
from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
from digit_recognizer.protos.contract import PIXELS_PER_IMAGE

CALLERS = 16


async def run(targets: tuple[str, ...], seconds: float, restart_after: float, command: str) -> dict:
    target = "ipv4:" + ",".join(targets)
    pixels = bytes(PIXELS_PER_IMAGE)
    image = np.zeros(PIXELS_PER_IMAGE, np.uint8)
    config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    outcomes = {"plain": collections.Counter(), "digit_client": collections.Counter()}
    stop_at = time.monotonic() + seconds

    async with (
        grpc.aio.insecure_channel(target, options=[("grpc.service_config", config)]) as channel,
        AsyncDigitClient(target) as client,
    ):
        stub = digits_pb2_grpc.DigitClassifierStub(channel)

        async def plain() -> None:
            while time.monotonic() < stop_at:
                try:
                    request = digits_pb2.ClassifyRequest(pixels_u8=pixels)
                    await stub.Classify(request, timeout=10)
                    outcomes["plain"]["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes["plain"][exc.code().name] += 1

        async def library() -> None:
            while time.monotonic() < stop_at:
                try:
                    await client.classify(image)
                    outcomes["digit_client"]["OK"] += 1
                except Exception as exc:  # the library's own error types
                    outcomes["digit_client"][type(exc).__name__] += 1

        async def restart() -> float:
            await asyncio.sleep(restart_after)
            started = time.monotonic()
            await asyncio.to_thread(
                subprocess.run, shlex.split(command), check=True, capture_output=True
            )
            return time.monotonic() - started

        callers = [plain() for _ in range(CALLERS // 2)] + [library() for _ in range(CALLERS // 2)]
        results = await asyncio.gather(restart(), *callers)
    return {"restart_s": round(results[0], 2), **{k: dict(v) for k, v in outcomes.items()}}


@click.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("--seconds", type=float, default=8.0, show_default=True)
@click.option("--restart-after", type=float, default=2.0, show_default=True)
@click.option("--command", required=True, help="What restarts one replica.")
def main(targets: tuple[str, ...], seconds: float, restart_after: float, command: str) -> None:
    click.echo(json.dumps(asyncio.run(run(targets, seconds, restart_after, command))))


if __name__ == "__main__":
    main()
