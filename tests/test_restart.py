"""Restarts fail no call: a draining server serves what reaches it, tells health-checking
clients to go elsewhere at once, and leaves when the calls have stopped (docs/operations.md)."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import signal
import time
import urllib.request

import grpc
import numpy as np

from digit_recognizer.client.client import AsyncDigitClient
from digit_recognizer.protos import digits_pb2, digits_pb2_grpc

from onnx_models import one_hot_image, save, slow_model
from processes import ServerProcess
from waiting import until

CALLERS = 16
PLAIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})  # no retry policy


def served_calls(server: ServerProcess) -> float:
    """digits_requests_total with code OK, from the server's own /metrics."""
    url = f"http://127.0.0.1:{server.metrics_port()}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("digits_requests_total{") and 'code="OK"' in line
    )


class Load:
    """CALLERS callers classifying as fast as they can until stopped; outcomes counted."""

    def __init__(self, classify) -> None:
        self._classify = classify
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._caller(i % 10)) for i in range(CALLERS)]

    async def _caller(self, digit: int) -> None:
        while not self._stop.is_set():
            try:
                self.outcomes[await self._classify(digit)] += 1
            except grpc.aio.AioRpcError as exc:
                self.outcomes[exc.code().name] += 1
            except Exception as exc:  # the client library's own errors
                self.outcomes[type(exc).__name__] += 1

    async def stop(self) -> collections.Counter[str]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes


def start(processes, model, *args: str) -> tuple[ServerProcess, int]:
    server = processes("--model", str(model), "--metrics-port", "0", *args)
    return server, server.wait_serving()


async def terminate(server: ServerProcess) -> str:
    server.proc.send_signal(signal.SIGTERM)
    code, log = await asyncio.to_thread(server.finish)
    assert code == 0 and "ended_calls=0" in log, log
    return log


async def replace(processes, model, server: ServerProcess, port: int) -> ServerProcess:
    """SIGTERM `server`, wait for it to exit 0, start its successor on the same port."""
    await terminate(server)
    successor, _ = start(processes, model, "--port", str(port))
    return successor


async def test_rolling_restart_under_load_fails_no_call_for_a_plain_round_robin_client(
    processes, tiny_model_path
):
    """Another team's client: grpc.aio, round_robin over both replicas, no retry policy,
    no health checking. It leaves a replica only on GOAWAY, so the draining replica serves
    it until its calls stop; then that replica exits 0 and comes back."""
    servers = [start(processes, tiny_model_path) for _ in range(2)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in servers)
    options = [("grpc.service_config", PLAIN_CONFIG), ("grpc.initial_reconnect_backoff_ms", 100)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)

        async def classify(digit: int) -> str:
            request = digits_pb2.ClassifyRequest(pixels=one_hot_image(digit))
            reply = await stub.Classify(request, timeout=10)
            return "OK" if reply.predictions[0].digit == digit else "WRONG"

        totals: collections.Counter[str] = collections.Counter()
        for index in range(2):  # replica 0, then replica 1: a full rolling restart
            server, port = servers[index]
            other = servers[1 - index][0]
            before = served_calls(other)
            load = Load(classify)
            await until(
                lambda other=other, before=before: served_calls(other) > before,
                "the other replica in use",
                timeout_s=20,
                blocking=True,
            )
            await asyncio.sleep(2)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(4)
            totals += await load.stop()
            servers[index] = (await replace(processes, tiny_model_path, server, port), port)
    assert set(totals) == {"OK"} and totals["OK"] > 1000, totals


async def test_rolling_restart_under_continuous_load_fails_no_call_for_digit_client(
    processes, tiny_model_path
):
    """DigitClient checks health: a SIGTERMed replica turns NOT_SERVING and gets no new calls
    within milliseconds, drains, exits 0 and comes back while the load never pauses."""
    servers = [start(processes, tiny_model_path) for _ in range(2)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in servers)
    options = [("grpc.initial_reconnect_backoff_ms", 100)]
    async with AsyncDigitClient(target, options=options) as client:

        async def classify(digit: int) -> str:
            return "OK" if (await client.classify(one_hot_image(digit))).digit == digit else "WRONG"

        load = Load(classify)
        drained_in = []
        for index in range(2):
            server, port = servers[index]
            other = servers[1 - index][0]
            before = served_calls(other)
            await until(
                lambda other=other, before=before: served_calls(other) > before + 100,
                "the other replica in use",
                timeout_s=20,
                blocking=True,
            )
            started = time.monotonic()
            servers[index] = (await replace(processes, tiny_model_path, server, port), port)
            drained_in.append(time.monotonic() - started)
        await asyncio.sleep(1)
        outcomes = await load.stop()
    assert set(outcomes) == {"OK"} and outcomes["OK"] > 1000, outcomes
    # It left as soon as the calls stopped arriving, not at the end of the grace period.
    assert max(drained_in) < 10, drained_in


async def test_a_burst_then_sigterm_is_answered_in_full(processes, tmp_path):
    """120 requests of 512 images on the wire, SIGTERM 0.3 s later: all 120 answered."""
    model = save(slow_model(width=256), tmp_path / "slow.onnx")
    server, port = start(processes, model, "--max-queue-size", str(120 * 512))
    images = np.stack([one_hot_image(i % 10) for i in range(512)])
    request = digits_pb2.ClassifyRequest(pixels_u8=(images * 255).astype(np.uint8).tobytes())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        calls = [asyncio.ensure_future(stub.Classify(request, timeout=120)) for _ in range(120)]
        await asyncio.sleep(0.3)
        in_flight = sum(not call.done() for call in calls)
        server.proc.send_signal(signal.SIGTERM)
        replies = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in replies if isinstance(r, Exception)]
    assert not failed, (len(failed), failed[:2])
    assert in_flight > 60, in_flight  # the test tested something: most were still on the wire
    assert all(len(reply.predictions) == 512 for reply in replies)
    code, log = await asyncio.to_thread(server.finish)
    assert code == 0 and "ended_calls=0" in log, log


async def test_a_client_that_never_stops_cannot_hold_the_server_past_its_grace(processes, tmp_path):
    model = save(slow_model(width=1024), tmp_path / "slow.onnx")
    server, port = start(processes, model, "--grace-period", "2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        request = digits_pb2.ClassifyRequest(pixels=np.tile(one_hot_image(3), 16))

        async def classify(digit: int) -> str:
            await stub.Classify(request, timeout=30)
            return "OK"

        load = Load(classify)
        await asyncio.sleep(1)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code, log = await asyncio.to_thread(server.finish)
        took = time.monotonic() - sent
        outcomes = await load.stop()
    assert code == 0, log
    assert took < 2 + 1 + 1.5, took  # grace + the 1 s stop + process exit
    ended = int(re.search(r"stopped .*ended_calls=(\d+)", log).group(1))
    assert ended > 0 and f"grace period over: ending {ended} calls" in log, log
    assert outcomes["OK"] > 0, outcomes  # it served while draining


async def test_drain_delay_keeps_serving_normally_with_health_not_serving(
    processes, tiny_model_path
):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, port = start(processes, tiny_model_path, "--drain-delay", "1.5")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for _ in range(200):  # bounded: 2 s
            reply = await health.Check(health_pb2.HealthCheckRequest())
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        answer = await stub.Classify(digits_pb2.ClassifyRequest(pixels=one_hot_image(4)))
        assert answer.predictions[0].digit == 4 and time.monotonic() - sent < 1.5
    code, log = await asyncio.to_thread(server.finish)
    assert code == 0 and "drain_delay_s=1.5" in log
    assert time.monotonic() - sent >= 1.5


async def test_the_client_still_reads_not_serving_from_a_draining_server(
    start_server, tiny_model_path
):
    """Its calls avoid a NOT_SERVING replica, but health() must still be able to say so."""
    server = await start_server(tiny_model_path)
    async with AsyncDigitClient(f"127.0.0.1:{server.port}") as client:
        assert await client.health() == "SERVING"
        await server.health.enter_graceful_shutdown()
        assert await client.health() == "NOT_SERVING"


async def test_every_front_serves_while_draining(start_server, tiny_model_path):
    from digit_recognizer.protos import inference_pb2, inference_pb2_grpc

    server = await start_server(tiny_model_path)
    server.plane.start_draining()
    await server.health.enter_graceful_shutdown()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert not (await oip.ServerReady(inference_pb2.ServerReadyRequest())).ready
        request = inference_pb2.ModelInferRequest(
            model_name="tiny",
            inputs=[inference_pb2.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="FP32", shape=[1, 784])],
            raw_input_contents=[one_hot_image(2).astype("<f4").tobytes()],
        )  # fmt: skip
        reply = await oip.ModelInfer(request)
        assert np.frombuffer(reply.raw_output_contents[0], "<f4").argmax() == 2
        stream = digits_pb2_grpc.DigitClassifierStub(channel).ClassifyStream(
            iter([digits_pb2.ClassifyRequest(request_id="d", pixels=one_hot_image(8))])
        )
        replies = [r async for r in stream]
    assert [(r.request_id, r.response.predictions[0].digit) for r in replies] == [("d", 8)]
