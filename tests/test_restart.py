"""Restarts fail no call: a draining server serves what reaches it, tells health-checking
clients to go elsewhere at once, and leaves when the calls have stopped (docs/operations.md)."""

from __future__ import annotations

import asyncio
import collections
import datetime
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
GRACE_S = 30  # longer than any drain here takes, even on a busy machine
PLAIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})  # no retry policy


def metric(server: ServerProcess, name: str, label: str = "") -> float:
    """The sum of metric `name`'s samples (those with `label` in them), from the server's own
    /metrics."""
    url = f"http://127.0.0.1:{server.metrics_port()}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.match(rf"{name}[{{ ]", line) and label in line
    )


def served_calls(server: ServerProcess) -> float:
    """digits_requests_total with code OK."""
    return metric(server, "digits_requests_total", 'code="OK"')


def logged(server: ServerProcess, message: str) -> re.Match[str] | None:
    """The server's log line `message` (with its fields), once it has been written."""
    return next(
        (m for line in list(server.log) if (m := re.search(rf"\] {message}( .*)?$", line))), None
    )


def logged_at(server: ServerProcess, message: str) -> float:
    """When the server wrote line `message`, in seconds on its own clock (ms resolution)."""
    line = next(line for line in server.log if re.search(rf"\] {message}( |$)", line))
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


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
            before = served_calls(server), served_calls(other)
            load = Load(classify)

            def in_use(server=server, other=other, before=before) -> bool:
                return min(served_calls(server) - before[0], served_calls(other) - before[1]) > 100

            await until(in_use, "both replicas in use", timeout_s=20, blocking=True)
            server.proc.send_signal(signal.SIGTERM)
            await until(lambda s=server: logged(s, "draining"), "the replica draining", 20)
            drained_from = served_calls(server)
            # It leaves only on GOAWAY: until then the draining replica serves it.
            await until(
                lambda s=server, n=drained_from: served_calls(s) > n + 100,
                "calls served while draining",
                timeout_s=20,
                blocking=True,
            )
            totals += await load.stop()
            servers[index] = (await replace(processes, tiny_model_path, server, port), port)
    assert set(totals) == {"OK"} and totals["OK"] > 1000, totals


async def test_rolling_restart_under_continuous_load_fails_no_call_for_digit_client(
    processes, tiny_model_path
):
    """DigitClient checks health: a SIGTERMed replica turns NOT_SERVING and gets no new calls
    within milliseconds, drains, exits 0 and comes back while the load never pauses."""
    grace = ("--grace-period", str(GRACE_S))
    servers = [start(processes, tiny_model_path, *grace) for _ in range(2)]
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
            await terminate(server)
            drained_in.append(time.monotonic() - started)
            servers[index] = (
                start(processes, tiny_model_path, "--port", str(port), *grace)[0],
                port,
            )
        # The client comes back to the replica restarted last, too.
        await until(
            lambda: served_calls(servers[1][0]) > 100, "the last one in use", 20, blocking=True
        )
        outcomes = await load.stop()
    assert set(outcomes) == {"OK"} and outcomes["OK"] > 1000, outcomes
    # It left as soon as the calls stopped arriving (~0.6 s here), not at the end of the grace
    # period: waiting that out takes GRACE_S and more, however fast the machine.
    assert max(drained_in) < GRACE_S, drained_in


async def test_a_burst_then_sigterm_is_answered_in_full(processes, tmp_path):
    """120 requests of 512 images on the wire, SIGTERM while most are in progress: all 120
    answered."""
    # Slow enough that the burst piles up: 60 or more stay in progress for ~1.2 s (2 cores).
    model = save(slow_model(width=1024), tmp_path / "slow.onnx")
    server, port = start(processes, model, "--max-queue-size", str(120 * 512))
    images = np.stack([one_hot_image(i % 10) for i in range(512)])
    request = digits_pb2.ClassifyRequest(pixels_u8=(images * 255).astype(np.uint8).tobytes())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        calls = [asyncio.ensure_future(stub.Classify(request, timeout=120)) for _ in range(120)]
        await until(
            lambda: metric(server, "digits_requests_in_flight") >= 60,
            "60 of the 120 in progress on the server",
            timeout_s=60,
            blocking=True,
        )
        server.proc.send_signal(signal.SIGTERM)
        replies = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in replies if isinstance(r, Exception)]
    assert not failed, (len(failed), failed[:2])
    assert all(len(reply.predictions) == 512 for reply in replies)
    code, log = await asyncio.to_thread(server.finish)
    assert code == 0 and "ended_calls=0" in log, log
    # The test tested something: the server itself says how many were in progress at SIGTERM
    # (a few of the 60 seen may have been answered before it came).
    draining = logged(server, "draining")
    assert draining and int(re.search(r"accepted_requests=(\d+)", draining[0])[1]) >= 40, log


async def test_a_client_that_never_stops_cannot_hold_the_server_past_its_grace(processes, tmp_path):
    model = save(slow_model(width=1024), tmp_path / "slow.onnx")
    server, port = start(processes, model, "--grace-period", "2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        # 16 callers x 64 images: four full batches of the slow model queued at any moment,
        # so calls are in progress when the grace ends even if this process is starved a
        # while (16 images each: none was, once, on a machine busy with other work).
        request = digits_pb2.ClassifyRequest(pixels=np.tile(one_hot_image(3), 64))

        async def classify(digit: int) -> str:
            await stub.Classify(request, timeout=30)
            return "OK"

        load = Load(classify)
        await until(lambda: served_calls(server) > 0, "the load served", 20, blocking=True)
        server.proc.send_signal(signal.SIGTERM)
        await until(lambda: logged(server, "draining"), "the server draining", 20)
        served_before = load.outcomes["OK"]
        code, log = await asyncio.to_thread(server.finish)  # 60 s: held forever, it fails
        outcomes = await load.stop()
    assert code == 0, log
    ended = int(re.search(r"stopped .*ended_calls=(\d+)", log).group(1))
    assert ended > 0 and f"grace period over: ending {ended} calls" in log, log
    assert outcomes["OK"] > served_before, outcomes  # it served while draining
    # On the server's own clock (its log, to the ms), not this busy one's: it served the whole
    # grace (2 s), then the stop gives what it ends at most 1 s; 1 s more for the rest of the
    # sequence. 2.02 s measured.
    took = logged_at(server, "stopped") - logged_at(server, "draining")
    assert 1.999 < took < 2 + 1 + 1, took


async def test_drain_delay_keeps_serving_normally_with_health_not_serving(
    processes, tiny_model_path
):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    # The health poll and the call below take ~10 ms here: a 3 s delay still holds them on a
    # machine a hundred times busier (1.5 s before, the same margin halved).
    delay_s = 3.0
    server, port = start(processes, tiny_model_path, "--drain-delay", str(delay_s))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        while (await health.Check(health_pb2.HealthCheckRequest())).status != not_serving:
            assert time.monotonic() - sent < delay_s, "still SERVING"
            await asyncio.sleep(0.01)
        answer = await stub.Classify(digits_pb2.ClassifyRequest(pixels=one_hot_image(4)))
        assert answer.predictions[0].digit == 4 and time.monotonic() - sent < delay_s
    code, log = await asyncio.to_thread(server.finish)
    assert code == 0 and f"drain_delay_s={delay_s}" in log
    assert time.monotonic() - sent >= delay_s


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
