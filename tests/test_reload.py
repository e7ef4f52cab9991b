"""Hot reload under load: new versions switch in with zero failed requests; bad files don't."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

import grpc
import numpy as np
from prometheus_client import REGISTRY

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
from digit_recognizer.server.batcher import Batcher, BatcherLimits

from onnx_models import CARD, one_hot_image, save, tiny_model
from waiting import until


def reloads(result: str) -> float:
    """Over every model and version (the series also carry those labels)."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "digits_model_reloads"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["result"] == result
    )


def publish(model, path, scratch) -> None:
    """What digit-train does: write next to the target, then rename over it."""
    temp = scratch / "incoming.onnx"
    temp.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    os.replace(temp, path)


async def test_reload_under_load_switches_versions_and_refuses_bad_files(start_server, tmp_path):
    path = save(tiny_model(), tmp_path / "model.onnx")
    server = await start_server(path, reload_interval_s=0.02)
    versions: list[str] = []
    failures: list[Exception] = []
    stop = asyncio.Event()

    async def caller(stub, digit):
        while not stop.is_set():
            try:
                reply = await stub.Classify(
                    digits_pb2.ClassifyRequest(pixels=one_hot_image(digit)), timeout=10
                )
                assert reply.predictions[0].digit == digit
                versions.append(reply.model_version)
            except Exception as exc:
                failures.append(exc)

    async def wait_until(condition, what):
        for _ in range(1000):  # bounded: 10 s
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        callers = [asyncio.ensure_future(caller(stub, d)) for d in range(8)]
        await wait_until(lambda: len(versions) > 50, "load")

        publish(tiny_model(replace(CARD, version="2")), path, tmp_path)
        await wait_until(lambda: versions[-1] == "2", "version 2 in replies")
        ok_before = reloads("ok")

        refused_before = reloads("refused")
        publish(b"\x00corrupt" * 100, path, tmp_path)
        await wait_until(lambda: reloads("refused") == refused_before + 1, "corrupt refused")
        other_labels = replace(CARD, version="3", labels=tuple("abcdefghij"))
        publish(tiny_model(other_labels), path, tmp_path)
        await wait_until(lambda: reloads("refused") == refused_before + 2, "labels refused")
        served = len(versions)
        await wait_until(lambda: len(versions) > served + 50, "more load")

        stop.set()
        await asyncio.gather(*callers)
        info = await stub.GetModelInfo(digits_pb2.GetModelInfoRequest())

    assert not failures, failures[:3]
    assert reloads("ok") == ok_before
    assert set(versions) <= {"1", "2"} and versions[-1] == "2"
    first_two = versions.index("2")
    assert set(versions[first_two:]) == {"2"}  # never back to the old model
    assert info.version == "2"


async def test_a_swap_takes_effect_between_runs_and_split_requests_report_both():
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    calls: list[str] = []

    def model(tag: str, block: bool):
        def predict(batch: np.ndarray) -> np.ndarray:
            calls.append(tag)
            if block:
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)
            return batch

        return predict

    batcher = Batcher(
        model("v1", block=True), BatcherLimits(max_batch_size=2, inline_max_us=0), version="v1"
    )
    batcher.start()
    split = asyncio.ensure_future(batcher.submit(np.arange(4, dtype=np.float32).reshape(4, 1)))
    await until(lambda: calls, "the first run")
    batcher.swap(model("v2", block=False), "v2")
    gate.set()
    result = await split
    assert calls == ["v1", "v2"] and result.versions == ("v1", "v2")
    assert (await batcher.submit(np.zeros((1, 1), np.float32))).versions == ("v2",)
    await batcher.close()


async def test_a_file_rewritten_in_place_is_refused_half_written_and_taken_whole(tmp_path):
    """Not atomic (an editor, `cp` over the file): the poll that sees half a file refuses it
    and keeps serving; the poll after the write completes serves the new version."""
    from digit_recognizer.server.dataplane import DataPlane, RequestLimits
    from digit_recognizer.server.inference import InferenceOptions
    from digit_recognizer.server.repository import ModelRepository, VersionPolicy

    path = save(tiny_model(), tmp_path / "model.onnx")
    plane = DataPlane(RequestLimits(8, 1 << 20), BatcherLimits())
    repo = ModelRepository(
        plane, path, is_directory=False, policy=VersionPolicy(),
        options=InferenceOptions(provider="cpu"), batcher_limits=BatcherLimits(), interval_s=0,
    )  # fmt: skip
    await repo.load()
    plane.default_model = "tiny"
    refused = reloads("refused")
    new = tiny_model(replace(CARD, version="2")).SerializeToString()
    with path.open("wb") as target:
        target.write(new[: len(new) // 2])
        target.flush()
        await repo.poll()  # half a file
        assert reloads("refused") == refused + 1 and plane.resolve().version == "1"
        target.write(new[len(new) // 2 :])
    os.utime(path, ns=(1, 2))  # the mtime of a write can equal the half write's
    await repo.poll()
    assert plane.resolve().version == "2"
    await plane.close()
