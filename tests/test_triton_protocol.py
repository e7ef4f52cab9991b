"""Triton's protocol extensions as the peers' own clients use them, defaults included:
tritonclient (grpc and http) and kserve's InferenceRESTClient, each in a venv of its own
(tests/peers/). Binary tensor data over REST both ways, ModelConfig, ModelStatistics (the
counts move by exactly the calls made), ModelStreamInfer (100 requests on one stream, an error
in-stream), model readiness as their clients read it (the status code alone), and our
inference.proto / model_config.proto against tritonclient's own generated messages."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from test_server import gated, wait_for

from bench import venvs
from digit_recognizer.protos import inference_pb2 as v2
from digit_recognizer.protos import inference_pb2_grpc
from digit_recognizer.server import rpc

from onnx_models import one_hot_image
from test_repository import publish
from waiting import until

PEERS = Path(__file__).parent / "peers"
TRITON_GRPC = ("tritonclient", "tritonclient[grpc]==2.73.*")
TRITON_HTTP = ("tritonclient-http", "tritonclient[http]==2.73.*")
KSERVE = ("kserve", "kserve==0.21.0", "onnxruntime==1.31.1")  # the bench's venv, shared
HEADER = "Inference-Header-Content-Length"


def peer_python(name: str, *requirements: str) -> Path:
    """The peer's interpreter (bench/venvs.py's cached venv). Where pip cannot install it the
    proof is missing: a skip that says so, and a failure in CI, which must prove it."""
    try:
        return venvs.peer_python(name, *requirements, timeout_s=600)
    except venvs.VenvError as exc:
        reason = f"compatibility with {' '.join(requirements)} is unproven here: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


async def run_peer(python: Path, script: str, *args: str) -> dict:
    """One of tests/peers/ in the peer's venv, in a thread: the in-process server it calls
    keeps serving on this test's event loop meanwhile."""
    run = await asyncio.to_thread(
        subprocess.run,
        [str(python), str(PEERS / script), *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture
async def repository_server(start_server, tmp_path):
    """Model "digits" (served) and "broken" (its one version does not load: not ready)."""
    root = tmp_path / "repo"
    publish(root, "digits", 1)
    publish(root, "broken", 1, model=b"not onnx")
    return await start_server(
        None, model_repository=root, http_port=0, max_images_per_request=8, max_delay_us=0
    )


def totals(stats: list[dict]) -> dict[str, int]:
    """The counters of one model version's statistics (gRPC JSON writes uint64 as strings)."""
    (one,) = stats
    inference = one["inference_stats"]
    batches = one.get("batch_stats", [])

    def count(name: str) -> int:
        return int(inference.get(name, {}).get("count", 0))

    return {
        "inference_count": int(one.get("inference_count", 0)),
        "execution_count": int(one.get("execution_count", 0)),
        "success": count("success"),
        "fail": count("fail"),
        "queue": count("queue"),
        "compute_infer": count("compute_infer"),
        "runs": sum(int(b["compute_infer"]["count"]) for b in batches),
        "images_run": sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in batches),
    }


def moved(before: list[dict], after: list[dict]) -> dict[str, int]:
    old, new = totals(before), totals(after)
    return {key: new[key] - old[key] for key in new}


async def test_tritonclient_grpc_config_statistics_stream_and_readiness(repository_server):
    python = peer_python(*TRITON_GRPC)
    server = repository_server
    result = await run_peer(python, "triton_protocol_grpc.py", f"127.0.0.1:{server.port}",
                            "digits", "broken")  # fmt: skip
    config = result["config"]
    assert (config["name"], config["platform"]) == ("digits", "onnxruntime_onnx")
    assert config["max_batch_size"] == 256
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": ["784"]}]
    assert config["output"][0]["name"] == "probabilities"
    assert config["output"][0]["dims"] == ["10"]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 4096
    assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", 1)]
    assert {"binary_tensor_data", "statistics", "model_configuration", "model_repository"} <= set(
        result["extensions"]
    )
    assert result["infer"] == [3, 1, 4]
    answers = {r["id"]: r["digits"] for r in result["stream"] if "id" in r}
    assert answers == {str(i): [i % 10] for i in range(100)}
    (error,) = [r["error"] for r in result["stream"] if "error" in r]
    assert "expected shape [N, 784]" in error
    # One infer of 3 images and 100 stream requests of one: exactly those, every image in
    # exactly one model run (however the batcher grouped them); the bad request never ran.
    assert moved(result["stats_before"], result["stats_after"]) | {"runs": 0} == {
        "inference_count": 103,
        "execution_count": moved(result["stats_before"], result["stats_after"])["runs"],
        "success": 101,
        "fail": 0,
        "queue": 101,
        "compute_infer": 101,
        "runs": 0,
        "images_run": 103,
    }
    assert result["ready"] == {"model": True, "not_ready": False, "unknown": False}


async def test_tritonclient_http_binary_tensors_config_statistics_and_readiness(
    repository_server,
):
    python = peer_python(*TRITON_HTTP)
    server = repository_server
    result = await run_peer(python, "triton_protocol_http.py", f"127.0.0.1:{server.http.port}",
                            "digits", "broken")  # fmt: skip
    assert "binary_tensor_data" in result["extensions"]
    assert result["defaults"] == [3, 1, 4] and result["defaults_id"] == "b1"
    assert result["defaults_binary"]
    assert result["uint8"] == [2, 7]
    assert result["json_in_binary_out"] == [9]
    config = result["config"]
    assert (config["name"], config["max_batch_size"]) == ("digits", 256)
    assert config["input"][0]["dims"] == [784]  # numbers over REST, as Triton answers
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    change = moved(result["stats_before"], result["stats_after"])
    assert change | {"execution_count": 0, "runs": 0} == {
        "inference_count": 6,
        "execution_count": 0,
        "success": 3,
        "fail": 0,
        "queue": 3,
        "compute_infer": 3,
        "runs": 0,
        "images_run": 6,
    }
    assert change["execution_count"] == change["runs"] == 3  # one call at a time: one run each
    assert result["ready"] == {"model": True, "not_ready": False, "unknown": False}


async def test_kserve_rest_client_sends_and_reads_binary_tensors(repository_server):
    python = peer_python(*KSERVE)
    server = repository_server
    result = await run_peer(python, "kserve_rest_check.py", f"127.0.0.1:{server.http.port}",
                            "digits", "broken")  # fmt: skip
    assert result["digits"] == [3, 1, 4] and result["id"] == "k1"
    assert result["binary_reply"]
    assert result["ready"] == {"model": True, "not_ready": False}


async def test_a_draining_server_says_its_models_are_not_ready(start_server, tiny_model_path):
    """Draining: calls are still served, but readiness turns false, and REST clients read it
    from the status code (400, Triton's), with the same JSON body."""
    python = peer_python(*TRITON_HTTP)
    server = await start_server(tiny_model_path, http_port=0)
    base = f"http://127.0.0.1:{server.http.port}"
    is_ready = (
        "import sys, tritonclient.http as t; "
        "print(t.InferenceServerClient(sys.argv[1]).is_model_ready(sys.argv[2]))"
    )

    async def tritonclient_says() -> str:
        run = await asyncio.to_thread(
            subprocess.run, [str(python), "-c", is_ready, base[7:], "tiny"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    async with aiohttp.ClientSession(base) as http:
        reply = await http.get("/v2/models/tiny/ready")
        assert (reply.status, await reply.json()) == (200, {"name": "tiny", "ready": True})
        assert await tritonclient_says() == "True"
        server.plane.start_draining()
        for path in ("/v2/models/tiny/ready", "/v2/models/tiny/versions/1/ready"):
            reply = await http.get(path)
            assert (reply.status, await reply.json()) == (400, {"name": "tiny", "ready": False})
        assert await tritonclient_says() == "False"
        reply = await http.get("/v2/models/nope/ready")
        assert (reply.status, await reply.json()) == (404, {"name": "nope", "ready": False})


def test_our_protos_are_wire_compatible_with_tritonclients_own():
    """Every message, enum and RPC we declare exists in tritonclient's generated modules with
    the same field numbers, names, types, labels and message types."""
    python = peer_python(*TRITON_GRPC)

    def shapes(interpreter: str, *modules: str) -> dict:
        run = subprocess.run(
            [interpreter, str(PEERS / "proto_descriptors.py"), *modules],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    theirs = shapes(
        str(python), "tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2"
    )
    ours = shapes(
        sys.executable,
        "digit_recognizer.protos.inference_pb2",
        "digit_recognizer.protos.model_config_pb2",
    )
    assert "inference.GRPCInferenceService" in ours and "inference.ModelConfig" in ours
    differences = []
    for name, mine in ours.items():
        their = theirs.get(name)
        if their is None:
            differences.append(f"{name}: not in tritonclient")
        elif mine["kind"] == "message":
            differences += [
                f"{name} field {number}: ours {field}, theirs {their['fields'].get(number)}"
                for number, field in mine["fields"].items()
                if their["fields"].get(number) != field
            ]
        elif mine["kind"] == "enum":
            differences += [
                f"{name}.{value}: ours {number}, theirs {their['values'].get(value)}"
                for value, number in mine["values"].items()
                if their["values"].get(value) != number
            ]
        else:
            differences += [
                f"{name}/{method}: ours {shape}, theirs {their['methods'].get(method)}"
                for method, shape in mine["methods"].items()
                if their["methods"].get(method) != shape
            ]
    assert differences == []


# Our own client, for what the peers' clients cannot show: errors, limits, the window.


@pytest.fixture
async def http(start_server, tiny_model_path):
    server = await start_server(tiny_model_path, http_port=0, max_images_per_request=8)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as session:
        yield session


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return b"".join([head, *blobs]), {HEADER: str(len(head))}


def pixels_header(images: int, size: int, datatype: str = "FP32") -> dict:
    return {
        "name": "pixels",
        "datatype": datatype,
        "shape": [images, 784],
        "parameters": {"binary_data_size": size},
    }


async def test_binary_reply_layout_and_json_outputs_beside_it(http):
    images = np.stack([one_hot_image(d) for d in (5, 8)]).astype("<f4")
    body, headers = binary_body(
        {
            "id": "x",
            "inputs": [pixels_header(2, images.nbytes)],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        },
        images.tobytes(),
    )
    reply = await http.post("/v2/models/tiny/infer", data=body, headers=headers)
    assert reply.status == 200 and reply.content_type == "application/octet-stream"
    raw = await reply.read()
    length = int(reply.headers[HEADER])
    head = json.loads(raw[:length])
    assert head["id"] == "x" and head["outputs"] == [
        {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [2, 10],
            "parameters": {"binary_data_size": 80},
        }
    ]
    probabilities = np.frombuffer(raw[length:], "<f4").reshape(2, 10)
    assert probabilities.argmax(axis=1).tolist() == [5, 8]
    # The same request asking for JSON outputs: a plain JSON reply.
    body, headers = binary_body(
        {"inputs": [pixels_header(2, images.nbytes)], "parameters": {"binary_data_output": False}},
        images.tobytes(),
    )
    reply = await http.post("/v2/models/tiny/infer", data=body, headers=headers)
    assert reply.content_type == "application/json" and HEADER not in reply.headers
    data = (await reply.json())["outputs"][0]["data"]
    np.testing.assert_allclose(np.reshape(data, (2, 10)), probabilities, atol=1e-7)


async def test_a_raw_binary_request_is_one_image(http):
    """Triton's raw binary request: header length 0, the body one FP32 image."""
    image = one_hot_image(6).astype("<f4")
    reply = await http.post("/v2/models/tiny/infer", data=image.tobytes(), headers={HEADER: "0"})
    assert reply.status == 200
    raw = await reply.read()
    length = int(reply.headers[HEADER])
    assert json.loads(raw[:length])["outputs"][0]["shape"] == [1, 10]
    assert np.frombuffer(raw[length:], "<f4").argmax() == 6


@pytest.mark.parametrize(
    ("header", "blob", "length", "message"),
    [
        ({"inputs": [pixels_header(1, 3136)]}, b"\0" * 3000, None, "runs past the end"),
        ({"inputs": [pixels_header(1, 3000)]}, b"\0" * 3000, None, "needs 3136 bytes of FP32"),
        ({"inputs": [pixels_header(1, 784, "UINT8")]}, b"\0" * 790, None, "add up to 784"),
        ({"inputs": [pixels_header(1, -1)]}, b"", None, "a whole number of bytes"),
        ({"inputs": [pixels_header(1, 784, "UINT8")]}, b"\0" * 784, "12x", "JSON's length"),
        ({"inputs": [pixels_header(1, 784, "UINT8")]}, b"\0" * 784, "99999", "holds"),
        ({"inputs": [pixels_header(1, 784, "UINT8")]}, b"\0" * 784, "5", "not JSON"),
        (
            {"inputs": [pixels_header(1, 3136)], "parameters": {"binary_data_output": 1}},
            b"\0" * 3136,
            None,
            "true or false",
        ),
    ],
)
async def test_binary_mistakes_are_json_400s(http, header, blob, length, message):
    body, headers = binary_body(header, blob)
    if length is not None:
        headers[HEADER] = length
    reply = await http.post("/v2/models/tiny/infer", data=body, headers=headers)
    assert reply.status == 400 and reply.content_type == "application/json"
    assert message in (await reply.json())["error"]


async def test_binary_requests_have_the_json_requests_limits(http):
    images = np.zeros((9, 784), "<f4")  # the fixture's limit is 8 images a request
    body, headers = binary_body({"inputs": [pixels_header(9, images.nbytes)]}, images.tobytes())
    reply = await http.post("/v2/models/tiny/infer", data=body, headers=headers)
    as_json = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [9, 784],
                           "data": images.ravel().tolist()}]}  # fmt: skip
    refused = await http.post("/v2/models/tiny/infer", json=as_json)
    assert reply.status == refused.status == 400
    assert (await reply.json())["error"] == (await refused.json())["error"]


async def test_statistics_and_config_routes(http):
    images = np.stack([one_hot_image(d) for d in (1, 2)])
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 784],
                        "data": images.ravel().tolist()}]}  # fmt: skip
    assert (await http.post("/v2/models/tiny/infer", json=body)).status == 200
    every = await (await http.get("/v2/models/stats")).json()
    one = await (await http.get("/v2/models/tiny/versions/1/stats")).json()
    assert every == one == await (await http.get("/v2/models/tiny/stats")).json()
    (stats,) = one["model_stats"]
    assert (stats["name"], stats["version"], stats["inference_count"]) == ("tiny", "1", 2)
    assert stats["batch_stats"][0]["batch_size"] == 2 and stats["last_inference"] > 0
    assert stats["inference_stats"]["success"]["count"] == 1
    assert stats["inference_stats"]["compute_infer"]["ns"] > 0
    missing = await http.get("/v2/models/tiny/versions/9/stats")
    assert (
        missing.status == 404 and "no model 'tiny' version '9'" in (await missing.json())["error"]
    )
    config = await (await http.get("/v2/models/tiny/versions/1/config")).json()
    assert config["name"] == "tiny" and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert (await http.get("/v2/models/nope/config")).status == 404


async def test_model_stream_infer_reads_at_most_the_window_ahead(start_server, tiny_model_path):
    """ModelStreamInfer has ClassifyStream's backpressure: a caller not reading replies cannot
    make the server read on."""
    model = gated(tiny_model_path)
    server = await start_server(tiny_model_path, model=model)
    count = 3 * rpc.STREAM_WINDOW

    def request(i: int) -> v2.ModelInferRequest:
        tensor = v2.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="FP32", shape=[1, 784]
        )
        tensor.contents.fp32_contents.extend(one_hot_image(i % 10).tolist())
        return v2.ModelInferRequest(model_name="tiny", id=str(i), inputs=[tensor])

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(iter([request(i) for i in range(count)]))
        await wait_for(model.started)
        await until(
            lambda: server.plane.active_requests >= rpc.STREAM_WINDOW, "a full window in flight"
        )
        await asyncio.sleep(0.2)  # time in which an unbounded reader would read on
        assert server.plane.active_requests == rpc.STREAM_WINDOW
        model.gate.set()
        replies = [reply async for reply in call]
    assert sorted(int(r.infer_response.id) for r in replies) == list(range(count))
    assert not any(r.error_message for r in replies)
