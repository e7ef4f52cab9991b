"""HTTP front in the same event loop (aiohttp): Open Inference Protocol REST routes, a picture
upload endpoint and the draw-a-digit page, all over the same batcher as the gRPC fronts.

Errors carry the same messages as gRPC with the HTTP status a browser or curl expects:
400 bad input (also a body over the size limit), 404 unknown model, 429 queue full, 503 draining,
504 deadline, 500 bug. The body is always JSON: {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from importlib import resources
from typing import Any

import grpc
import numpy as np
from aiohttp import BodyPartReader, web

from digit_recognizer.client.errors import ImageError
from digit_recognizer.client.images import to_mnist
from digit_recognizer.protos import inference_pb2
from digit_recognizer.server.errors import InvalidInput
from digit_recognizer.server.oip import InferenceService
from digit_recognizer.server.security import UNAUTHENTICATED_MESSAGE
from digit_recognizer.server.service import DigitClassifierService

log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
REQUEST_TIMEOUT_S = 30.0
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def build_app(
    digits: DigitClassifierService, v2: InferenceService, max_body: int, token: str | None
) -> web.Application:
    middlewares = [_bearer_token(token)] if token else []
    app = web.Application(client_max_size=max(max_body, MAX_UPLOAD_BYTES), middlewares=middlewares)
    routes = _Routes(digits, v2)
    app.router.add_get("/", routes.page)
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_get("/v2", routes.server_metadata)
    app.router.add_get("/v2/models/{name}", routes.model_metadata)
    app.router.add_get("/v2/models/{name}/ready", routes.model_ready)
    app.router.add_post("/v2/models/{name}/infer", routes.infer)
    app.router.add_post("/v1/classify", routes.classify_picture)
    return app


class _Routes:
    def __init__(self, digits: DigitClassifierService, v2: InferenceService) -> None:
        self._digits = digits
        self._v2 = v2

    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("digit_recognizer.server").joinpath("static/index.html")
        return web.Response(text=html.read_text(), content_type="text/html")

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = not self._digits.draining
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "digit-recognizer", "extensions": []})

    async def model_metadata(self, request: web.Request) -> web.Response:
        return await self._guarded("http_model_metadata", self._metadata(request))

    async def model_ready(self, request: web.Request) -> web.Response:
        async def check() -> dict[str, Any]:
            self._v2.check_served(request.match_info["name"])
            return {"name": request.match_info["name"], "ready": not self._digits.draining}

        return await self._guarded("http_model_ready", check())

    async def infer(self, request: web.Request) -> web.Response:
        return await self._guarded("http_infer", self._infer(request))

    async def classify_picture(self, request: web.Request) -> web.Response:
        return await self._guarded("http_classify", self._classify_picture(request))

    async def _metadata(self, request: web.Request) -> dict[str, Any]:
        self._v2.check_served(request.match_info["name"])
        meta = self._v2.metadata()
        return {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": [_tensor_json(t) for t in meta.inputs],
            "outputs": [_tensor_json(t) for t in meta.outputs],
        }

    async def _infer(self, request: web.Request) -> dict[str, Any]:
        body = await _json_body(request)
        inputs = body.get("inputs")
        if not isinstance(inputs, list):
            raise InvalidInput('the body needs "inputs": [{"name", "shape", "datatype", "data"}]')
        message = inference_pb2.ModelInferRequest(
            model_name=request.match_info["name"], id=str(body.get("id", ""))
        )
        for item in inputs:
            if not isinstance(item, dict):
                raise InvalidInput("each input must be an object with name, shape, datatype, data")
            tensor = message.inputs.add(
                name=str(item.get("name", "")), datatype=str(item.get("datatype", ""))
            )
            try:
                tensor.shape.extend(int(d) for d in item.get("shape", []))
                data = np.asarray(item.get("data", []), dtype=np.float32).ravel()
            except (TypeError, ValueError) as exc:
                raise InvalidInput(
                    f"input {tensor.name!r}: shape and data must be numbers ({exc})"
                ) from None
            tensor.contents.fp32_contents.extend(data.tolist())
        for wanted in body.get("outputs") or []:
            message.outputs.add(
                name=str(wanted.get("name", "")) if isinstance(wanted, dict) else ""
            )
        reply = await self._v2.infer(message, REQUEST_TIMEOUT_S)
        outputs = []
        for tensor, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
            values = np.frombuffer(raw, "<f4")
            outputs.append(
                {
                    "name": tensor.name,
                    "datatype": tensor.datatype,
                    "shape": list(tensor.shape),
                    "data": values.tolist(),
                }
            )
        return {
            "model_name": reply.model_name,
            "model_version": reply.model_version,
            "id": reply.id,
            "outputs": outputs,
        }

    async def _classify_picture(self, request: web.Request) -> dict[str, Any]:
        name, data = await _upload(request)
        try:
            pixels = await asyncio.to_thread(to_mnist, data, name)
        except ImageError as exc:
            raise InvalidInput(str(exc)) from None
        result = await self._digits.classify_pixels(pixels.reshape(1, 784), REQUEST_TIMEOUT_S)
        probabilities = result.outputs[0]
        digit = int(probabilities.argmax())
        labels = self._digits.model.card.labels
        return {
            "name": name,
            "digit": digit,
            "label": labels[digit],
            "confidence": float(probabilities[digit]),
            "probabilities": [float(p) for p in probabilities],
            "labels": list(labels),
            "model_version": result.version,
            "pixels": [round(float(v), 3) for v in pixels],
        }

    async def _guarded(self, method: str, work: Any) -> web.Response:
        started = time.perf_counter()
        try:
            body = await work
        except Exception as exc:
            status = self._digits.status_of(exc, method)
            self._digits.observe(method, status.code, started)
            http_status = _HTTP_STATUS.get(status.code, 500)
            return web.json_response({"error": status.message}, status=http_status)
        self._digits.observe(method, grpc.StatusCode.OK, started)
        return web.json_response(body)


def _tensor_json(tensor: inference_pb2.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _bearer_token(token: str) -> Any:
    """Same rule as gRPC: everything but the page and the health routes needs the token."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" or request.path.startswith("/v2/models"):
            presented = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(presented, expected):
                return web.json_response({"error": UNAUTHENTICATED_MESSAGE}, status=401)
        return await handler(request)

    return check


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise InvalidInput(
            f"the body is larger than {request.app._client_max_size} bytes"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"the body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    return body


async def _upload(request: web.Request) -> tuple[str, bytes]:
    """The picture: a multipart form field (any name) or the raw request body."""
    try:
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            part = await reader.next()
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("the form holds no file")
            data = await part.read()
            name = part.filename or "upload"
        else:
            data = await request.read()
            name = "upload"
    except web.HTTPRequestEntityTooLarge:
        raise InvalidInput(f"the picture is larger than {MAX_UPLOAD_BYTES} bytes") from None
    if not data:
        raise InvalidInput("no picture received: POST an image file (multipart or raw body)")
    return name, bytes(data)


class HttpFront:
    """Owns the aiohttp runner; started and stopped with the gRPC server."""

    def __init__(self, app: web.Application, host: str, port: int, reuse_port: bool) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self._host = host.strip("[]") or "::"
        self._port = port
        self._reuse_port = reuse_port  # --workers N share the HTTP port like the gRPC one
        self.port = 0

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_port=self._reuse_port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await self._runner.cleanup()
