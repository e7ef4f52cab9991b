"""The repository's bounds: --max-models, --max-model-bytes (and a config.pbtxt's size),
symbolic links out of the repository, and metric series that follow what is served. Real
servers on 127.0.0.1:0 with a repository in tmp_path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc, inference_pb2_grpc
from digit_recognizer.protos import inference_pb2 as v2
from digit_recognizer.server.batcher import BatcherLimits
from digit_recognizer.server.config import ServerConfig
from digit_recognizer.server.dataplane import ControlRefused, DataPlane, RequestLimits
from digit_recognizer.server.errors import ModelError
from digit_recognizer.server.inference import InferenceOptions
from digit_recognizer.server.repository import (
    MAX_CONFIG_BYTES,
    ModelRepository,
    RepositoryLimits,
    VersionPolicy,
)

from onnx_models import one_hot_image, save, tiny_model
from test_repository import publish, withdraw
from waiting import until

REPOSITORY_LOG = "digit_recognizer.server.repository"


@pytest.fixture(autouse=True)
def _one_process_metrics(monkeypatch):
    # Series are removed in one process only (prometheus_client cannot in multi-process
    # mode); a test that ran the supervisor in this process may have left the variable.
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def padded_model(extra_bytes: int) -> bytes:
    """A loadable model made bigger by a long metadata value."""
    model = tiny_model()
    model.metadata_props.add(key="padding", value="x" * extra_bytes)
    return model.SerializeToString()


def labelled(model: str, version: str | None = None) -> list[str]:
    """The digits_* samples in this process's registry labelled with `model` (and
    `version`), by the names the per-model metrics use."""
    found = []
    for family in REGISTRY.collect():
        for sample in family.samples:
            name = sample.labels.get("model", sample.labels.get("name"))
            if (
                sample.name.startswith("digits_")
                and name == model
                and (version is None or sample.labels.get("version") == version)
            ):
                found.append(sample.name)
    return found


async def listed(stub: digits_pb2_grpc.DigitClassifierStub) -> dict[tuple[str, str], tuple]:
    reply = await stub.ListModels(digits_pb2.ListModelsRequest(), timeout=10)
    return {(m.model, m.version): (m.state, m.reason) for m in reply.models}


async def test_models_past_max_models_are_listed_with_the_reason_until_there_is_room(
    start_server, tmp_path, caplog
):
    root = tmp_path / "repo"
    for name in ("a", "b"):
        publish(root, name, 1)
    server = await start_server(None, model_repository=root, max_models=2, reload_interval_s=0.02)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        with caplog.at_level(logging.WARNING, REPOSITORY_LOG):
            publish(root, "d", 1)
            publish(root, "c", 1)
            publish(root, "a", 2)  # a new version of a served model takes its old one's place
            plane = server.plane
            await until(
                lambda: len(plane.statuses()) == 4 and plane.is_served("a", "2"), "c, d left out"
            )
            states = await listed(stub)
            assert {key: state for key, (state, _) in states.items()} == {
                ("a", "2"): "READY", ("b", "1"): "READY",
                ("c", "1"): "UNAVAILABLE", ("d", "1"): "UNAVAILABLE",
            }  # fmt: skip
            assert "serves at most --max-models 2 model versions" in states[("c", "1")][1]
            oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            index = await oip.RepositoryIndex(v2.RepositoryIndexRequest())
            reasons = {(m.name, m.version): m.reason for m in index.models}
            assert "--max-models 2" in reasons[("d", "1")]
            assert labelled("c") == [] and labelled("d") == []  # no series: never served

            withdraw(root, "b", 1)  # room for one: the first by name
            request = digits_pb2.ClassifyRequest(pixels=one_hot_image(4), model="c")
            await until(lambda: plane.is_served("c"), "c served once b left")
            assert (await stub.Classify(request, timeout=10)).predictions[0].digit == 4
            states = await listed(stub)
            assert states[("c", "1")] == ("READY", "") and states[("d", "1")][0] == "UNAVAILABLE"
            assert ("b", "1") not in states
    # One WARNING line named each version left out, once: not once per 20 ms poll.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for version in ("c/1", "d/1"):
        assert len([w for w in warnings if version in w]) == 1, warnings
    assert all("over --max-models 2: " in w for w in warnings), warnings


async def test_explicit_load_past_max_models_is_refused_with_the_reason(tmp_path):
    for name in ("a", "b"):
        publish(tmp_path, name, 1)
    plane = DataPlane(RequestLimits(8, 1 << 20), BatcherLimits())
    repo = ModelRepository(
        plane,
        tmp_path,
        is_directory=True,
        policy=VersionPolicy.parse("latest"),
        options=InferenceOptions(provider="cpu"),
        batcher_limits=BatcherLimits(),
        interval_s=0,
        control_mode="explicit",
        load_models=["a"],
        limits=RepositoryLimits(max_models=1),
    )
    await repo.load()
    with pytest.raises(ControlRefused, match=r"failed to load 'b': .*--max-models 1"):
        await repo.load_named("b")
    await repo.unload_named("a")
    await repo.load_named("b")  # room now: asked again, it loads
    assert [s.key for s in plane.served()] == [("b", "1")]
    assert [(s.model, s.state, s.reason) for s in plane.statuses()] == [
        ("a", "UNAVAILABLE", "unloaded"), ("b", "READY", ""),
    ]  # fmt: skip
    await plane.close()


async def test_files_over_the_size_limits_are_refused_by_their_size(start_server, tmp_path):
    root = tmp_path / "repo"
    publish(root, "small", 1)
    publish(root, "big", 1, model=padded_model(300_000))  # loadable, but too big
    publish(root, "configured", 1)
    config = "max_batch_size: 8\n" + "# a comment\n" * (MAX_CONFIG_BYTES // 12 + 1)
    (root / "configured" / "config.pbtxt").write_text(config)  # valid, but too big
    server = await start_server(
        None, model_repository=root, max_model_bytes=200_000, reload_interval_s=0
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        states = await listed(digits_pb2_grpc.DigitClassifierStub(channel))
    assert states[("small", "1")] == ("READY", "")
    state, reason = states[("big", "1")]
    size = (root / "big" / "1" / "model.onnx").stat().st_size
    assert state == "UNAVAILABLE"
    assert f"{size:,} bytes, over --max-model-bytes 200,000 (raise it" in reason
    state, reason = states[("configured", "")]
    assert state == "UNAVAILABLE" and f"over the {MAX_CONFIG_BYTES:,} a model configuration" in (
        reason
    )


async def test_a_model_file_over_the_limit_is_refused_at_start(start_server, tmp_path):
    path = save(tiny_model(), tmp_path / "model.onnx")
    with pytest.raises(ModelError, match=r"bytes, over --max-model-bytes 1,000 "):
        await start_server(path, max_model_bytes=1000)


async def test_symbolic_links_out_of_the_repository_are_refused_and_links_within_it_followed(
    start_server, tmp_path
):
    root, outside = tmp_path / "repo", tmp_path / "outside"
    publish(root, "inside", 1)
    publish(outside, "elsewhere", 1)  # outside/elsewhere/1/model.onnx
    (outside / "config.pbtxt").write_text("max_batch_size: 8\n")
    for name in ("linked_version", "linked_file", "linked_config"):
        (root / name).mkdir()
    (root / "linked_version" / "1").symlink_to(outside / "elsewhere" / "1")
    (root / "linked_file" / "1").mkdir()
    (root / "linked_file" / "1" / "model.onnx").symlink_to(outside / "elsewhere/1/model.onnx")
    publish(root, "linked_config", 1)
    (root / "linked_config" / "config.pbtxt").symlink_to(outside / "config.pbtxt")
    (root / "linked_model").symlink_to(outside / "elsewhere")
    (root / "alias").symlink_to("inside")  # relative, within the repository: fine
    (root / "alias_version").mkdir()
    (root / "alias_version" / "1").symlink_to(root / "inside" / "1")
    server = await start_server(None, model_repository=root, reload_interval_s=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        states = await listed(digits_pb2_grpc.DigitClassifierStub(channel))
    assert {key: state for key, (state, _) in states.items()} == {
        ("alias", "1"): "READY", ("alias_version", "1"): "READY", ("inside", "1"): "READY",
        ("linked_config", ""): "UNAVAILABLE", ("linked_file", "1"): "UNAVAILABLE",
        ("linked_model", ""): "UNAVAILABLE", ("linked_version", "1"): "UNAVAILABLE",
    }  # fmt: skip
    real = os.path.realpath(outside)
    for key, part in {
        ("linked_version", "1"): "linked_version/1",
        ("linked_file", "1"): "linked_file/1/model.onnx",
        ("linked_config", ""): "linked_config/config.pbtxt",
        ("linked_model", ""): "linked_model",
    }.items():
        reason = states[key][1]
        assert f"{root / part} resolves to {real}" in reason, reason
        assert f"outside the repository {root}" in reason


async def test_metric_series_follow_what_is_served(start_server, tmp_path):
    root = tmp_path / "repo"
    publish(root, "series", 1)
    server = await start_server(None, model_repository=root, reload_interval_s=0.02)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        request = digits_pb2.ClassifyRequest(pixels=one_hot_image(2), model="series")
        assert (await stub.Classify(request, timeout=10)).model_version == "1"
        assert "digits_requests_total" in labelled("series", "1")
        assert "digits_model_info" in labelled("series", "1")

        publish(root, "series", 2)  # latest: version 1 retires
        publish(root, "junk", 1, model=b"\x00corrupt" * 50)
        await until(lambda: labelled("series", "1") == [], "version 1's series removed")
        assert (await stub.Classify(request, timeout=10)).model_version == "2"
        assert "digits_requests_total" in labelled("series", "2")
        assert ("junk", "1") in await listed(stub)
        assert labelled("junk") == []  # refused: counted without its name

        publish(root, "other", 1)  # so that the repository still serves something
        await until(lambda: server.plane.is_served("other"), "other served")
        withdraw(root, "series", 1)
        withdraw(root, "series", 2)
        await until(lambda: labelled("series") == [], f"every series removed: {labelled('series')}")


def test_the_limits_are_validated_like_every_flag():
    problems = ServerConfig(model=Path("m.onnx"), max_models=0, max_model_bytes=0).validate()
    assert "--max-models must be at least 1, got 0" in problems
    assert "--max-model-bytes must be at least 1, got 0" in problems
