"""The HTTP front: Open Inference Protocol REST, picture upload, the page, error statuses."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

from onnx_models import one_hot_image
from waiting import until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
async def http(start_server, tiny_model_path):
    server = await start_server(tiny_model_path, http_port=0, max_images_per_request=8)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as session:
        yield session


async def test_v2_rest_health_metadata_and_infer(http):
    assert (await (await http.get("/v2/health/live")).json()) == {"live": True}
    assert (await http.get("/v2/health/ready")).status == 200
    meta = await (await http.get("/v2/models/tiny")).json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 784]}]
    images = np.stack([one_hot_image(d) for d in (2, 7)])
    body = {
        "id": "q1",
        "inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [2, 784], "data": images.tolist()}
        ],
    }
    reply = await http.post("/v2/models/tiny/infer", json=body)
    assert reply.status == 200
    result = await reply.json()
    assert result["id"] == "q1" and result["model_version"] == "1"
    (output,) = result["outputs"]
    assert output["shape"] == [2, 10]
    assert np.asarray(output["data"]).reshape(2, 10).argmax(axis=1).tolist() == [2, 7]
    as_uint8 = {
        "inputs": [{**body["inputs"][0], "datatype": "UINT8", "data": (images * 255).tolist()}]
    }
    reply = await (await http.post("/v2/models/tiny/infer", json=as_uint8)).json()
    np.testing.assert_allclose(reply["outputs"][0]["data"], output["data"], atol=1e-6)
    as_uint8["inputs"][0]["data"][0][0] = 0.5
    reply = await http.post("/v2/models/tiny/infer", json=as_uint8)
    assert reply.status == 400 and "UINT8 value 0.5 at index 0" in (await reply.json())["error"]


@pytest.mark.parametrize(
    ("path", "payload", "status", "message"),
    [
        ("/v2/models/nope/infer", {"inputs": []}, 404, "no model 'nope' here"),
        ("/v2/models/tiny/infer", {"inputs": "x"}, 400, '"inputs"'),
        (
            "/v2/models/tiny/infer",
            {
                "inputs": [
                    {"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [2.0] * 784}
                ]
            },
            400,
            "image 0, pixel 0 (row 0, column 0) is 2.0",
        ),
        (
            "/v2/models/tiny/infer",
            {
                "inputs": [
                    {"name": "pixels", "datatype": "FP32", "shape": [1, 3], "data": [0, 0, 0]}
                ]
            },
            400,
            "expected shape [N, 784]",
        ),
    ],
)
async def test_rest_errors_have_status_and_message(http, path, payload, status, message):
    reply = await http.post(path, json=payload)
    assert reply.status == status
    assert message in (await reply.json())["error"]


async def test_not_json_is_400(http):
    reply = await http.post("/v2/models/tiny/infer", data=b"{nope")
    assert reply.status == 400 and "not JSON" in (await reply.json())["error"]


@pytest.mark.parametrize("name", ["mnist-0-label7.png", "photo-4-label4-jpeg.jpg"])
async def test_upload_real_pictures(http, name):
    form = aiohttp.FormData()
    form.add_field("file", (EXAMPLES / name).read_bytes(), filename=name)
    reply = await http.post("/v1/classify", data=form)
    assert reply.status == 200, await reply.text()
    result = await reply.json()
    assert result["name"] == name and len(result["probabilities"]) == 10
    assert len(result["pixels"]) == 784 and result["label"] == str(result["digit"])


async def test_upload_raw_body_and_bad_pictures(http):
    picture = io.BytesIO()
    Image.fromarray((one_hot_image(5).reshape(28, 28) * 255).astype(np.uint8)).save(picture, "PNG")
    ok = await http.post("/v1/classify", data=picture.getvalue())
    assert ok.status == 200 and (await ok.json())["digit"] == 5
    bad = await http.post("/v1/classify", data=b"not a picture")
    assert bad.status == 400 and "not an image Pillow can read" in (await bad.json())["error"]
    empty = await http.post("/v1/classify", data=b"")
    assert empty.status == 400 and "no picture received" in (await empty.json())["error"]


async def test_the_page_is_served(http):
    reply = await http.get("/")
    text = await reply.text()
    assert reply.status == 200 and "<canvas" in text and "v1/classify" in text
    assert "v1/read" in text and "doesn't look like a digit" in text  # photos of numbers


async def test_draining_is_not_ready_but_still_serves(start_server, tiny_model_path):
    server = await start_server(tiny_model_path, http_port=0)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as session:
        server.plane.start_draining()
        assert (await session.get("/v2/health/ready")).status == 503
        reply = await session.post(
            "/v1/classify", data=(EXAMPLES / "mnist-0-label7.png").read_bytes()
        )
        assert reply.status == 200


class _Scripted:
    """Stands in for a model's predict: slow, or failing."""

    def __init__(self, model, delay_s: float = 0.0, fail: bool = False) -> None:
        self._model, self._delay_s, self._fail = model, delay_s, fail

    def __call__(self, pixels):
        import time

        time.sleep(self._delay_s)
        if self._fail:
            raise RuntimeError("scripted failure")
        return self._model.predict(pixels)


def _model_with(path, **script):
    import dataclasses

    from digit_recognizer.server.inference import InferenceOptions, Model, load_model

    model = load_model(path, InferenceOptions(provider="cpu"))

    @dataclasses.dataclass(frozen=True)
    class Scripted(Model):
        def predict(self, pixels):
            return _Scripted(model, **script)(pixels)

    return Scripted(**{f.name: getattr(model, f.name) for f in dataclasses.fields(Model)})


def _infer_body(digit: int) -> dict:
    pixels = one_hot_image(digit).tolist()
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": pixels}]}


async def test_a_failed_model_run_is_a_500_without_details(start_server, tiny_model_path, caplog):
    model = _model_with(tiny_model_path, fail=True)
    server = await start_server(tiny_model_path, model=model, http_port=0)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as session:
        reply = await session.post("/v2/models/tiny/infer", json=_infer_body(1))
        error = (await reply.json())["error"]
    assert reply.status == 500 and "model run failed" in error and "scripted" not in error


async def test_queue_full_is_429_and_an_expired_request_is_504(
    start_server, tiny_model_path, monkeypatch
):
    """Each status from a state the test waits for, not from a race between a short timeout
    and the harness (CI once saw 504 for 429: the queued call, given 0.6 s, had expired
    before the third call arrived)."""
    from digit_recognizer.server import http as front

    model = _model_with(tiny_model_path, delay_s=1.5)
    server = await start_server(
        tiny_model_path, model=model, http_port=0, max_queue_size=1, max_images_per_request=1
    )
    plane = server.plane
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as session:
        running = asyncio.ensure_future(session.post("/v2/models/tiny/infer", json=_infer_body(1)))
        await until(lambda: plane.active_requests, "the first call running")
        queued = asyncio.ensure_future(session.post("/v2/models/tiny/infer", json=_infer_body(2)))
        await until(lambda: plane.queued_images >= 1, "the second call queued")
        full = await session.post("/v2/models/tiny/infer", json=_infer_body(3))
        assert full.status == 429 and "queue full" in (await full.json())["error"]
        assert (await running).status == 200
        # The second call now runs for 1.5 s: a call given 0.2 s waits behind it and expires.
        await until(lambda: plane.queued_images == 0, "the second call running")
        monkeypatch.setattr(front, "REQUEST_TIMEOUT_S", 0.2)
        expired = await session.post("/v2/models/tiny/infer", json=_infer_body(4))
        assert expired.status == 504
        assert (await queued).status == 200


async def test_wrong_method_and_unknown_route_are_json_too(http):
    wrong = await http.get("/v1/classify")
    assert wrong.status == 405 and wrong.headers["Allow"] == "POST"
    assert "GET is not allowed on /v1/classify" in (await wrong.json())["error"]
    missing = await http.get("/v3/nothing")
    assert missing.status == 404 and (await missing.json())["error"] == "no route /v3/nothing"


async def test_the_page_has_an_icon(http):
    icon = await http.get("/favicon.ico")
    assert icon.status == 200 and icon.content_type == "image/svg+xml"
    assert "<svg" in await icon.text()


async def test_every_interface_means_ipv4_too(start_server, tiny_model_path):
    """The default host "[::]": asyncio alone would bind IPv6 only and refuse 127.0.0.1."""
    server = await start_server(tiny_model_path, host="[::]", http_port=0)
    loopbacks = ["127.0.0.1"] + (["[::1]"] if socket.has_dualstack_ipv6() else [])
    for address in loopbacks:  # one port for both families, also when the port was 0
        async with aiohttp.ClientSession(f"http://{address}:{server.http.port}") as session:
            assert (await session.get("/v2/health/live")).status == 200, address
