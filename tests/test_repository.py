"""A repository of models and versions: policies, refusals, and versions that come and go
under load with zero failed calls, through digits.v1, OIP gRPC and OIP REST."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import replace
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc, inference_pb2_grpc
from digit_recognizer.protos import inference_pb2 as v2
from digit_recognizer.server.batcher import BatcherLimits
from digit_recognizer.server.dataplane import DataPlane, RequestLimits
from digit_recognizer.server.errors import ModelError, ModelNotFound
from digit_recognizer.server.inference import InferenceOptions
from digit_recognizer.server.repository import ModelRepository, VersionPolicy

from onnx_models import CARD, one_hot_image, tiny_model
from waiting import until


def publish(root: Path, name: str, version: int, model=None, shift: int = 0) -> Path:
    """As an operator should: write the version beside its place, then rename it in."""
    staging = root / name / f".incoming-{version}"
    staging.mkdir(parents=True)
    content = model if isinstance(model, bytes) else (model or tiny_model(shift=shift))
    data = content if isinstance(content, bytes) else content.SerializeToString()
    (staging / "model.onnx").write_bytes(data)
    target = root / name / str(version)
    os.replace(staging, target)
    return target


def withdraw(root: Path, name: str, version: int) -> None:
    hidden = root / name / f".removed-{version}"
    os.replace(root / name / str(version), hidden)
    shutil.rmtree(hidden)


@pytest.mark.parametrize(
    ("text", "available", "served"),
    [
        ("latest", {1, 2, 10}, {10}),
        ("all", {1, 2, 10}, {1, 2, 10}),
        ("specific:1,10", {1, 2, 10}, {1, 10}),
        ("specific:3", {1, 2}, set()),
        ("latest", set(), set()),
    ],
)
def test_version_policies_choose_like_tf_serving(text, available, served):
    policy = VersionPolicy.parse(text)
    assert policy.select(available) == served and str(policy) == text


@pytest.mark.parametrize("text", ["newest", "specific:", "specific:0", "specific:a", "all:1"])
def test_bad_version_policies_say_what_is_accepted(text):
    with pytest.raises(ValueError, match="use latest, all, or specific:V"):
        VersionPolicy.parse(text)


def repository(plane: DataPlane, root: Path, policy: str) -> ModelRepository:
    return ModelRepository(
        plane,
        root,
        is_directory=True,
        policy=VersionPolicy.parse(policy),
        options=InferenceOptions(provider="cpu"),
        batcher_limits=BatcherLimits(),
        interval_s=0,
    )


def served(plane: DataPlane) -> list[tuple[str, str]]:
    return [s.key for s in plane.served()]


async def test_latest_moves_forward_and_never_to_a_version_that_fails(tmp_path):
    publish(tmp_path, "digits", 1)
    publish(tmp_path, "digits", 2)
    (tmp_path / "digits" / "3.partial").mkdir()  # not a version: never looked at
    (tmp_path / "digits" / "0").mkdir()
    plane = DataPlane(RequestLimits(8, 1 << 20), BatcherLimits())
    repo = repository(plane, tmp_path, "latest")
    await repo.load()
    assert served(plane) == [("digits", "2")]

    publish(tmp_path, "digits", 10)  # numerically, not alphabetically, the latest
    await repo.poll()
    assert served(plane) == [("digits", "10")]

    publish(tmp_path, "digits", 11, model=b"\x00corrupt" * 50)
    other_labels = replace(CARD, labels=tuple("abcdefghij"))
    publish(tmp_path, "digits", 12, model=tiny_model(other_labels))
    await repo.poll()
    await repo.poll()  # refused files are not retried until they change
    assert served(plane) == [("digits", "10")]
    states = {(s.version, s.state): s.reason for s in plane.statuses()}
    assert "not a loadable ONNX model" in states[("11", "UNAVAILABLE")]
    assert "labels" in states[("12", "UNAVAILABLE")]
    assert plane.statuses(ready_only=True)[0].version == "10"
    withdraw(tmp_path, "digits", 11)
    await repo.poll()
    assert [(s.version, s.state) for s in plane.statuses()] == [
        ("10", "READY"), ("12", "UNAVAILABLE"),
    ]  # fmt: skip
    await plane.close()


async def test_specific_versions_and_an_empty_repository(tmp_path):
    for version in (1, 2, 3):
        publish(tmp_path, "digits", version)
    plane = DataPlane(RequestLimits(8, 1 << 20), BatcherLimits())
    await repository(plane, tmp_path, "specific:1,3").load()
    assert served(plane) == [("digits", "1"), ("digits", "3")]
    await plane.close()
    with pytest.raises(ModelError, match=r"no servable model in .*<name>/<version>/model.onnx"):
        await repository(
            DataPlane(RequestLimits(8, 1 << 20), BatcherLimits()), tmp_path, "specific:7"
        ).load()


async def test_unknown_models_and_versions_name_what_is_served(tmp_path):
    publish(tmp_path, "digits", 1)
    publish(tmp_path, "digits", 2)
    publish(tmp_path, "shifted", 1, shift=1)
    plane = DataPlane(RequestLimits(8, 1 << 20), BatcherLimits())
    await repository(plane, tmp_path, "all").load()
    plane.default_model = "digits"
    assert plane.resolve().key == ("digits", "2")
    assert plane.resolve("digits", "1").key == ("digits", "1")
    for model, version in (("nope", ""), ("digits", "9")):
        with pytest.raises(ModelNotFound) as info:
            plane.resolve(model, version)
        assert "this server serves 'digits' versions '1', '2'; 'shifted' version '1'" in str(
            info.value
        )
    await plane.close()


async def test_a_repository_served_through_every_front_while_versions_come_and_go(
    start_server, tmp_path
):
    root = tmp_path / "repo"
    publish(root, "digits", 1)
    publish(root, "digits", 2)
    publish(root, "shifted", 1, shift=1)
    server = await start_server(
        None, model_repository=root, version_policy="all", reload_interval_s=0.02, http_port=0
    )
    target = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        digits = digits_pb2_grpc.DigitClassifierStub(channel)
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def classify(digit: int, **fields) -> digits_pb2.ClassifyResponse:
            request = digits_pb2.ClassifyRequest(pixels=one_hot_image(digit), **fields)
            return await digits.Classify(request, timeout=10)

        # digits.v1: the default model (first name), its latest version, or what is asked for.
        listed = await digits.ListModels(digits_pb2.ListModelsRequest())
        assert listed.default_model == "digits"
        assert [(m.model, m.version, m.state) for m in listed.models] == [
            ("digits", "1", "READY"), ("digits", "2", "READY"), ("shifted", "1", "READY"),
        ]  # fmt: skip
        assert (await classify(3)).model_version == "2"
        assert (await classify(3, model="digits", model_version="1")).model_version == "1"
        shifted = await classify(3, model="shifted")
        assert (shifted.predictions[0].digit, shifted.model_version) == (4, "1")
        info = await digits.GetModelInfo(digits_pb2.GetModelInfoRequest(model="shifted"))
        assert (info.model, info.model_version, info.name) == ("shifted", "1", "tiny")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await classify(3, model="nope")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no model 'nope' here; this server serves 'digits' versions" in (
            error.value.details()
        )

        # OIP gRPC: model_name/model_version on every call, and the repository index.
        request = v2.ModelInferRequest(
            model_name="shifted", model_version="1",
            inputs=[v2.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="FP32", shape=[1, 784])],
            raw_input_contents=[one_hot_image(5).astype("<f4").tobytes()],
        )  # fmt: skip
        reply = await oip.ModelInfer(request)
        assert (reply.model_name, reply.model_version) == ("shifted", "1")
        assert np.frombuffer(reply.raw_output_contents[0], "<f4").argmax() == 6
        assert (await oip.ModelReady(v2.ModelReadyRequest(name="digits", version="1"))).ready
        assert not (await oip.ModelReady(v2.ModelReadyRequest(name="digits", version="7"))).ready
        meta = await oip.ModelMetadata(v2.ModelMetadataRequest(name="digits"))
        assert list(meta.versions) == ["1", "2"]
        index = await oip.RepositoryIndex(v2.RepositoryIndexRequest(ready=True))
        assert [(m.name, m.version) for m in index.models] == [
            ("digits", "1"), ("digits", "2"), ("shifted", "1"),
        ]  # fmt: skip

        # OIP REST, with /versions/<v> routes.
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
            body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784],
                                "data": one_hot_image(8).tolist()}]}  # fmt: skip
            rest = await (await http.post("/v2/models/shifted/versions/1/infer", json=body)).json()
            assert (rest["model_name"], rest["model_version"]) == ("shifted", "1")
            assert int(np.argmax(rest["outputs"][0]["data"])) == 9
            meta = await (await http.get("/v2/models/digits/versions/2")).json()
            assert meta["versions"] == ["1", "2"]
            missing = await http.post("/v2/models/digits/versions/5/infer", json=body)
            assert missing.status == 404
            rest_index = await (await http.post("/v2/repository/index", json={})).json()
            assert len(rest_index) == 3

        # Under load: a version added, one removed, a broken one refused; no call fails.
        versions: list[str] = []
        failures: list[Exception] = []
        stop = asyncio.Event()

        async def caller(digit: int, **fields) -> None:
            while not stop.is_set():
                try:
                    reply = await classify(digit, **fields)
                    assert reply.predictions[0].digit == digit
                    versions.append(reply.model_version)
                except Exception as exc:
                    failures.append(exc)

        async def listed_versions() -> list[tuple[str, str]]:
            reply = await digits.ListModels(digits_pb2.ListModelsRequest())
            return [(m.version, m.state) for m in reply.models if m.model == "digits"]

        callers = [asyncio.ensure_future(caller(d)) for d in range(6)]
        callers += [asyncio.ensure_future(caller(d, model_version="2")) for d in (1, 7)]
        await until(lambda: len(versions) > 50, "load")
        publish(root, "digits", 3)
        await until(lambda: versions[-1] == "3" or "3" in versions[-8:], "version 3")
        withdraw(root, "digits", 1)
        publish(root, "digits", 4, model=b"\x00corrupt" * 50)
        for _ in range(500):  # bounded: 5 s
            if await listed_versions() == [("2", "READY"), ("3", "READY"), ("4", "UNAVAILABLE")]:
                break
            await asyncio.sleep(0.01)
        assert await listed_versions() == [
            ("2", "READY"), ("3", "READY"), ("4", "UNAVAILABLE"),
        ]  # fmt: skip
        served_so_far = len(versions)
        await until(lambda: len(versions) > served_so_far + 50, "more load")
        stop.set()
        await asyncio.gather(*callers)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await classify(3, model_version="1")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

    assert not failures, failures[:3]
    first_three = versions.index("3")
    assert set(versions[first_three:]) <= {"2", "3"}  # only the pinned callers ask for 2


async def test_the_client_library_and_cli_pick_models(start_server, tmp_path):
    from click.testing import CliRunner

    from digit_recognizer.client.cli import main
    from digit_recognizer.client.client import AsyncDigitClient
    from digit_recognizer.client.errors import DigitClientError

    root = tmp_path / "repo"
    publish(root, "digits", 1)
    publish(root, "shifted", 1, shift=1)
    publish(root, "shifted", 2, model=b"broken")
    server = await start_server(None, model_repository=root, version_policy="all")
    target = f"127.0.0.1:{server.port}"
    async with AsyncDigitClient(target, model="shifted", model_version="1") as client:
        assert (await client.classify(one_hot_image(2))).digit == 3
        assert (await client.model_info()).model == "shifted"
        listed = await client.list_models()
    assert [(m.model, m.version, m.state) for m in listed.models] == [
        ("digits", "1", "READY"), ("shifted", "1", "READY"), ("shifted", "2", "UNAVAILABLE"),
    ]  # fmt: skip
    async with AsyncDigitClient(target, model="nope") as client:
        with pytest.raises(DigitClientError, match="no model 'nope' here"):
            await client.classify(one_hot_image(2))

    runner = CliRunner()
    shown = await asyncio.to_thread(runner.invoke, main, ["models", "--target", target])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].split("\t") == ["digits (default)", "1", "READY"]
    assert lines[2].startswith("shifted\t2\tUNAVAILABLE  ") and "not a loadable" in lines[2]
