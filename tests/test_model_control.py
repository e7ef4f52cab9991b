"""Per-model configuration (config.pbtxt) and explicit model control (load/unload), through
the real fronts; the peers' own clients in tests/test_peer_clients.py-style venvs."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from test_peer_clients import peer_python, run_peer

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc, inference_pb2_grpc
from digit_recognizer.protos import inference_pb2 as v2
from digit_recognizer.protos import model_config_pb2 as mc
from digit_recognizer.server.batcher import BatcherLimits
from digit_recognizer.server.dataplane import DataPlane, RequestLimits, ServedVersion
from digit_recognizer.server.inference import InferenceOptions, load_model
from digit_recognizer.server.model_config import (
    ModelSettings,
    VersionPolicy,
    describe,
    settings_from_pbtxt,
)
from digit_recognizer.server.repository import ModelRepository

from onnx_models import one_hot_image, slow_model
from test_repository import publish
from waiting import until

# What Triton's docs write for an ONNX model like ours (platform, batching, named tensors).
TRITON_CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "pixels" data_type: TYPE_FP32 dims: [ 784 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] }} ]
{extra}
"""
DEFAULTS = ModelSettings.from_flags(BatcherLimits(), VersionPolicy())


def configure(root: Path, name: str, max_batch_size: int = 8, extra: str = "", text: str = ""):
    path = root / name / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        text or TRITON_CONFIG.format(name=name, max_batch_size=max_batch_size, extra=extra)
    )
    return path


def images(count: int, digit: int = 3) -> np.ndarray:
    return np.tile(one_hot_image(digit), (count, 1))


def oip_request(model: str, count: int = 1, digit: int = 3) -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name=model,
        inputs=[v2.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="FP32", shape=[count, 784])],
        raw_input_contents=[images(count, digit).astype("<f4").tobytes()],
    )  # fmt: skip


# config.pbtxt, read.


def test_a_config_sets_batching_and_names_what_it_ignores_in_one_warning(tmp_path, caplog):
    path = configure(
        tmp_path, "bulk", max_batch_size=64,
        extra="""
        version_policy: { all { } }
        dynamic_batching {
          max_queue_delay_microseconds: 1500
          preferred_batch_size: [ 16, 32 ]
          default_queue_policy { max_queue_size: 2048 timeout_action: DELAY }
        }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        optimization { execution_accelerators {
          cpu_execution_accelerator: [ { name: "openvino" } ] } }
        model_warmup [ { name: "zeros" batch_size: 1 } ]
        parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
        """,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, "digit_recognizer.server.model_config"):
        settings = settings_from_pbtxt(path, DEFAULTS, max_images_per_request=1024)
    assert (settings.max_batch_size, settings.max_queue_delay_us, settings.max_queue_size) == (
        64, 1500, 2048,
    )  # fmt: skip
    assert (str(settings.version_policy), settings.instance_kind) == ("all", "cpu")
    assert settings.batcher_limits == BatcherLimits(
        64, 1500, 2048, DEFAULTS.inline_max_us, preferred_batch_sizes=(16, 32)
    )
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "preferred_batch_size" not in warnings[0]  # honoured: see the batcher's tests
    for ignored in ("timeout_action", "optimization", "model_warmup", "parameters",
                    "instance_group.count 2"):  # fmt: skip
        assert ignored in warnings[0]
    assert "max_queue_delay" not in warnings[0] and "max_batch_size" not in warnings[0]


async def test_the_served_config_is_what_runs_not_what_the_file_asked(tmp_path):
    publish(tmp_path, "bulk", 1)
    path = configure(
        tmp_path, "bulk", max_batch_size=64,
        extra="""dynamic_batching { max_queue_delay_microseconds: 1500 preferred_batch_size: [16]
                                    default_queue_policy { max_queue_size: 2048 } }
                 instance_group [ { count: 4 kind: KIND_CPU } ]""",
    )  # fmt: skip
    settings = settings_from_pbtxt(path, DEFAULTS, max_images_per_request=1024)
    model = load_model(tmp_path / "bulk" / "1" / "model.onnx", InferenceOptions("cpu"))
    config = describe(ServedVersion("bulk", "1", model, settings), workers=3)
    assert (config.name, config.platform, config.max_batch_size) == ("bulk", "onnxruntime_onnx", 64)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("pixels", mc.TYPE_FP32, [784])
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [("probabilities", [10])]
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == 1500
    assert batching.default_queue_policy.max_queue_size == 2048
    assert list(batching.preferred_batch_size) == [16]  # honoured, so shown
    [group] = config.instance_group
    assert (group.kind, group.count) == (mc.ModelInstanceGroup.KIND_CPU, 3)  # the workers
    assert config.version_policy.WhichOneof("policy_choice") == "latest"


def triton_config(old: str = "", new: str = "", max_batch_size: int = 8) -> str:
    """Model m's Triton config with `old` replaced by `new`."""
    return TRITON_CONFIG.format(name="m", max_batch_size=max_batch_size, extra="").replace(
        old, new, 1
    )


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (triton_config('"pixels"', '"input_1"'),
         "input 'input_1' is not the ONNX model's input 'pixels'"),
        (triton_config(max_batch_size=8192), "max_batch_size 8192 is above the queue's 4096"),
        (triton_config("[ 784 ]", "[ 28, 28 ]"),
         "input 'pixels' dims [28, 28]: the model takes [784] per image"),
        (triton_config("TYPE_FP32", "TYPE_UINT8"),
         "input 'pixels' is TYPE_UINT8; the ONNX model takes TYPE_FP32"),
        (triton_config("[ 10 ]", "[ 12 ]"),
         "output 'probabilities' is TYPE_FP32 [12]; the model gives TYPE_FP32 [10]"),
        ('platform: "tensorflow_savedmodel"', "platform 'tensorflow_savedmodel': this server"),
        ('name: "other"', "name 'other' is not the model's folder name 'm'"),
        ("sequence_batching { }", "sequence batching (stateful models) is not served"),
        ("max_batch_size: 8 dynamic_batching { default_queue_policy { max_queue_size: 100 } }",
         "max_queue_size 100 is below the server's --max-images-per-request 1024"),
        ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }",
         "preferred_batch_size 8 is not in 1..max_batch_size (4)"),
        ("max_batch_sise: 4", "not a Triton model configuration"),
    ],
)  # fmt: skip
async def test_a_contradictory_config_refuses_its_model_and_the_rest_serves(
    tmp_path, config, reason
):
    publish(tmp_path, "good", 1)
    configure(tmp_path, "good", max_batch_size=16)
    publish(tmp_path, "m", 1)
    configure(tmp_path, "m", text=config)
    plane = DataPlane(RequestLimits(1024, 1 << 22), BatcherLimits())
    repository = ModelRepository(
        plane, tmp_path, is_directory=True, policy=VersionPolicy(),
        options=InferenceOptions(provider="cpu"), batcher_limits=BatcherLimits(), interval_s=0,
    )  # fmt: skip
    await repository.load()
    try:
        assert [s.key for s in plane.served()] == [("good", "1")]
        [refused] = [s for s in plane.statuses() if s.model == "m"]
        assert refused.state == "UNAVAILABLE" and reason in refused.reason, refused.reason
        assert "config.pbtxt" in refused.reason
    finally:
        await plane.close()


# Two models, two configs: the difference is served and executed.


async def test_two_models_with_different_configs_serve_and_batch_differently(
    start_server, tmp_path
):
    root = tmp_path / "repo"
    publish(root, "interactive", 1)
    configure(root, "interactive", max_batch_size=4)
    publish(root, "bulk", 1)
    configure(
        root, "bulk", max_batch_size=64,
        extra="dynamic_batching { max_queue_delay_microseconds: 2000 }",
    )  # fmt: skip
    publish(root, "plain", 1)  # no config.pbtxt: the flags
    server = await start_server(None, model_repository=root, max_batch_size=32, http_port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        digits = digits_pb2_grpc.DigitClassifierStub(channel)
        served = {}
        for name in ("interactive", "bulk", "plain"):
            reply = await oip.ModelConfig(v2.ModelConfigRequest(name=name))
            batching = reply.config.dynamic_batching
            served[name] = (reply.config.max_batch_size, batching.max_queue_delay_microseconds)
        assert served == {"interactive": (4, 0), "bulk": (64, 2000), "plain": (32, 0)}

        executed = {}
        for name in ("interactive", "bulk", "plain"):
            request = digits_pb2.ClassifyRequest(model=name, pixels=images(48).ravel())
            reply = await digits.Classify(request, timeout=10)
            assert [p.digit for p in reply.predictions] == [3] * 48
            executed[name] = (reply.telemetry.batch_size, reply.telemetry.batches)
        # 48 images: runs of at most 4 (12 of them), one run of 48, runs of at most 32.
        assert executed == {"interactive": (4, 12), "bulk": (48, 1), "plain": (32, 2)}

    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
        config = await (await http.get("/v2/models/interactive/config")).json()
        assert config["max_batch_size"] == 4


# Explicit model control.


async def _explicit_server(start_server, root: Path, **overrides):
    return await start_server(
        None, model_repository=root, model_control_mode="explicit", load_model=("a",),
        http_port=0, **overrides,
    )  # fmt: skip


async def test_explicit_mode_loads_and_unloads_what_is_asked_and_only_that(start_server, tmp_path):
    root = tmp_path / "repo"
    publish(root, "a", 1)
    publish(root, "b", 1, shift=1)
    configure(root, "b", max_batch_size=4)
    server = await _explicit_server(start_server, root)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def ready(name: str) -> bool:
            return (await oip.ModelReady(v2.ModelReadyRequest(name=name))).ready

        async def code_of(call) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            return error.value.code(), error.value.details()

        assert await ready("a") and not await ready("b")  # on disk, not asked for
        await oip.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="b"))
        assert await ready("b")
        reply = await oip.ModelInfer(oip_request("b"))
        assert np.frombuffer(reply.raw_output_contents[0], "<f4").argmax() == 4  # b's answer
        config = await oip.ModelConfig(v2.ModelConfigRequest(name="b"))
        assert config.config.max_batch_size == 4

        code, details = await code_of(
            oip.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="nope"))
        )
        assert code == grpc.StatusCode.NOT_FOUND and "no model 'nope' in the repository" in details
        with_config = v2.RepositoryModelLoadRequest(model_name="b")
        with_config.parameters["config"].string_param = '{"max_batch_size": 2}'
        code, details = await code_of(oip.RepositoryModelLoad(with_config))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "config are not supported" in details

        # A broken config refuses the load, and what served keeps serving.
        configure(root, "b", max_batch_size=8192)
        code, details = await code_of(
            oip.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="b"))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "failed to load 'b'" in details
        assert "max_batch_size 8192" in details and await ready("b")
        configure(root, "b", max_batch_size=2)
        await oip.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="b"))
        config = await oip.ModelConfig(v2.ModelConfigRequest(name="b"))
        assert config.config.max_batch_size == 2  # reloaded with its new config

        await oip.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="b"))
        assert not await ready("b")
        code, _ = await code_of(oip.ModelInfer(oip_request("b")))
        assert code == grpc.StatusCode.NOT_FOUND
        index = await oip.RepositoryIndex(v2.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
            ("a", "1", "READY", ""), ("b", "1", "UNAVAILABLE", "unloaded"),
        ]  # fmt: skip

        # REST: the same, Triton's routes.
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
            loaded = await http.post("/v2/repository/models/b/load", json={})
            assert loaded.status == 200, await loaded.text()
            assert await ready("b")
            unloaded = await http.post("/v2/repository/models/b/unload")  # no body at all
            assert unloaded.status == 200 and not await ready("b")
            missing = await http.post("/v2/repository/models/nope/load")
            assert missing.status == 404


async def test_load_and_unload_need_explicit_mode_and_the_token(start_server, tmp_path):
    root = tmp_path / "repo"
    publish(root, "a", 1)
    publish(root, "b", 1)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    polled = await start_server(None, model_repository=root, http_port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{polled.port}") as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await oip.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="a"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control-mode poll" in error.value.details()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{polled.http.port}") as http:
        refused = await http.post("/v2/repository/models/a/unload")
        assert refused.status == 400 and "explicit" in (await refused.json())["error"]

    guarded = await _explicit_server(start_server, root, auth_token_file=token)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await oip.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="b"))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await oip.RepositoryModelLoad(
            v2.RepositoryModelLoadRequest(model_name="b"),
            metadata=[("authorization", "Bearer s3cret")],
        )
    async with aiohttp.ClientSession(f"http://127.0.0.1:{guarded.http.port}") as http:
        assert (await http.post("/v2/repository/models/b/unload")).status == 401
        signed = await http.post(
            "/v2/repository/models/b/unload", headers={"Authorization": "Bearer s3cret"}
        )
        assert signed.status == 200
    assert guarded.plane.is_served("a") and not guarded.plane.is_served("b")


async def test_loading_and_unloading_under_load_fails_no_call_of_the_other_models(
    start_server, tmp_path
):
    root = tmp_path / "repo"
    publish(root, "a", 1)
    publish(root, "b", 1, shift=1)
    server = await _explicit_server(start_server, root)
    answered: list[int] = []
    failures: list[Exception] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def caller(digit: int) -> None:
            while not stop.is_set():
                try:
                    reply = await oip.ModelInfer(oip_request("a", 4, digit), timeout=10)
                    assert np.frombuffer(reply.raw_output_contents[0], "<f4").argmax() == digit
                    answered.append(digit)
                except Exception as exc:
                    failures.append(exc)

        callers = [asyncio.ensure_future(caller(d)) for d in range(6)]
        await until(lambda: len(answered) > 50, "load on a")
        for _ in range(3):
            await oip.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="b"))
            assert server.plane.is_served("b")
            target = len(answered) + 20
            await until(lambda t=target: len(answered) > t, "a served while b is loaded")
            await oip.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="b"))
            assert not server.plane.is_served("b")
        stop.set()
        await asyncio.gather(*callers)
    assert not failures, failures[:3]


# A version that is taking calls, retired under load: every call answered.


def _slow_repository(root: Path, name: str, version: int) -> None:
    publish(root, name, version, model=slow_model(width=1024))
    configure(root, name, max_batch_size=8)


async def _calls_in_flight(
    oip: inference_pb2_grpc.GRPCInferenceServiceStub,
    model: str,
    outcomes: list[tuple[float, str]],
    stop: asyncio.Event,
) -> None:
    """Calls of 8 images on `model` until `stop`: (time answered, version or status code)."""
    while not stop.is_set():
        try:
            reply = await oip.ModelInfer(oip_request(model, 8, 5), timeout=30)
            assert np.frombuffer(reply.raw_output_contents[0], "<f4")[:10].argmax() == 5
            outcomes.append((time.monotonic(), reply.model_version))
        except grpc.aio.AioRpcError as exc:
            outcomes.append((time.monotonic(), exc.code().name))


async def test_a_version_taking_calls_is_retired_by_a_newer_one_and_answers_them_all(
    start_server, tmp_path
):
    root = tmp_path / "repo"
    _slow_repository(root, "digits", 1)
    server = await start_server(None, model_repository=root, reload_interval_s=0)
    outcomes: list[tuple[float, str]] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        callers = [
            asyncio.ensure_future(_calls_in_flight(oip, "digits", outcomes, stop)) for _ in range(8)
        ]
        first = server.plane.resolve("digits")
        await until(lambda: len(outcomes) > 8 and first.batcher.queued_images >= 16, "a queue")
        publish(root, "digits", 2, model=slow_model(width=1024))
        await server.repository.poll()  # policy latest: 2 is served, 1 retired with a queue
        retired = time.monotonic()
        assert server.plane.resolve("digits").version == "2"
        await until(lambda: any(v == "2" for _, v in outcomes[-4:]), "calls answered by 2")
        stop.set()
        await asyncio.gather(*callers)
    assert {v for _, v in outcomes} == {"1", "2"}, outcomes  # every call answered, no error
    assert any(v == "1" and t > retired for t, v in outcomes)  # 1 answered after retiring


async def test_an_explicit_unload_answers_every_call_the_model_accepted(start_server, tmp_path):
    root = tmp_path / "repo"
    publish(root, "a", 1)
    _slow_repository(root, "b", 1)
    server = await start_server(
        None, model_repository=root, model_control_mode="explicit", load_model=("a", "b")
    )
    outcomes: list[tuple[float, str]] = []
    others: list[tuple[float, str]] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        callers = [
            asyncio.ensure_future(_calls_in_flight(oip, "b", outcomes, stop)) for _ in range(8)
        ]
        callers.append(asyncio.ensure_future(_calls_in_flight(oip, "a", others, stop)))
        b = server.plane.resolve("b")
        await until(lambda: len(outcomes) > 8 and b.batcher.queued_images >= 16, "a queue on b")
        asked = time.monotonic()
        await oip.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="b"))
        unloaded = time.monotonic()
        assert b.batcher.queued_images == 0  # what it accepted was answered before the reply
        count = len(others)
        await until(lambda: len(others) > count + 10, "a still served")
        stop.set()
        await asyncio.gather(*callers)
    answered = [t for t, v in outcomes if v == "1"]
    assert {v for _, v in outcomes} <= {"1", "NOT_FOUND"}, outcomes  # no call dropped
    assert any(asked < t for t in answered)  # b was taking calls when it was unloaded
    assert all(v == "NOT_FOUND" for t, v in outcomes if t > unloaded + 1.0)
    assert {v for _, v in others} == {"1"}  # the other model: zero failed calls


# The peers' own clients, as their docs show for explicit mode.


def test_tritonclient_loads_and_unloads_models_in_explicit_mode(processes, tmp_path):
    root = tmp_path / "repo"
    publish(root, "a", 1)
    publish(root, "b", 1, shift=1)
    configure(root, "b", max_batch_size=4)
    grpc_python = peer_python("tritonclient", "tritonclient[grpc]==2.73.*")
    http_python = peer_python("tritonclient-http", "tritonclient[http]==2.73.*")
    server = processes(
        "--model-repository", str(root), "--model-control-mode", "explicit",
        "--load-model", "a", "--http-port", "0",
    )  # fmt: skip
    port = server.wait_serving()
    for python, address in ((grpc_python, port), (http_python, server.http_port())):
        result = run_peer(python, "triton_control_check.py", address, model="b")
        assert result["before"] == {"a": True, "b": False}
        assert result["after_load"] == {"a": True, "b": True}
        assert result["config"]["max_batch_size"] == 4
        assert result["digits"] == [4, 2]  # b's answers for 3 and 1
        assert result["after_unload"] == {"a": True, "b": False}
        assert "no model 'nope' in the repository (it has a, b;" in result["load_unknown"]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"load_model": ("a",)}, "--load-model needs --model-control-mode explicit"),
        ({"model_control_mode": "explicit"}, "name the models to serve at start with --load-model"),
        ({"model_control_mode": "explicit", "load_model": ("a", "*")}, "'*' means every model"),
        ({"model_control_mode": "explicit", "load_model": ("a",), "workers": 2},
         "explicit needs --workers 1"),
        ({"model_control_mode": "watch"}, "--model-control-mode must be none, poll, explicit"),
    ],
)  # fmt: skip
def test_model_control_settings_are_checked_at_start(tmp_path, settings, problem):
    from digit_recognizer.server.config import ServerConfig

    config = ServerConfig(model=Path("-"), model_repository=tmp_path, **settings)
    assert [p for p in config.validate() if problem in p], config.validate()
    without_repository = ServerConfig(model=Path("-"), model_control_mode="explicit")
    assert "--model-control-mode explicit needs --model-repository" in (
        without_repository.validate()
    )


async def test_a_config_change_keeps_the_version_listed_as_served_in_the_metrics(tmp_path):
    from prometheus_client import REGISTRY

    from test_repository import repository

    def info() -> list[tuple[str, float]]:
        return [
            (s.labels["version"], s.value)
            for family in REGISTRY.collect() if family.name == "digits_model_info"
            for s in family.samples if s.labels["name"] == "cfgmetric"
        ]  # fmt: skip

    publish(tmp_path, "cfgmetric", 1)
    plane = DataPlane(RequestLimits(8, 1 << 20), BatcherLimits())
    repo = repository(plane, tmp_path, "latest")
    await repo.load()
    assert info() == [("1", 1.0)]
    (tmp_path / "cfgmetric" / "config.pbtxt").write_text("max_batch_size: 8\n")
    await repo.poll()  # the same file, new batchers: the replaced one closes
    assert [s.key for s in plane.served()] == [("cfgmetric", "1")]
    assert info() == [("1", 1.0)]
    await plane.close()
