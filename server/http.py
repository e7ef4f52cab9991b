"""The HTTP front (aiohttp, in the gRPC server's event loop): Open Inference Protocol REST
routes, a picture upload endpoint and the draw-a-digit page, over the same data plane.

Errors carry the same messages as gRPC with the HTTP status a browser or curl expects:
400 bad input (also a body over the size limit), 401 no token, 404 unknown model, 415 a
compressed body or a JSON route given another type, 429 queue full, 503 unavailable, 504
deadline, 500 bug. The body is always JSON: {"error": "..."}. Bodies are never decompressed:
aiohttp would inflate them in the event loop while parsing, before any check (an 8 MB gzip
body is 8 GB), so an encoded body is refused, after the token check, before it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import grpc
import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from digit_recognizer.client.errors import ImageError
from digit_recognizer.client.images import to_mnist
from digit_recognizer.client.reading import choose, is_read
from digit_recognizer.protos.contract import PIXELS_PER_IMAGE
from digit_recognizer.server import model_config
from digit_recognizer.server import openinference as oi
from digit_recognizer.server.dataplane import Call, CallFailed, Classified, DataPlane, ServedVersion
from digit_recognizer.server.errors import InvalidInput, Overloaded, cut, first_line
from digit_recognizer.server.json_bodies import BINARY_HINT, JsonBodies, loads, max_json_bytes
from digit_recognizer.server.reader import Found, Readers
from digit_recognizer.server.security import UNAUTHENTICATED_MESSAGE, is_open_http
from digit_recognizer.server.tracing import HttpCall

log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
BODY_TIMEOUT_S = 30.0  # a body trickling in slower than this is refused
# A picture is decoded whole (Pillow): at most 64 MB of it (64 megapixels of grey, 16 of
# colour; JPEGs are decoded at a reduced scale first, so phone photos of any size pass), and
# at most MAX_CONCURRENT_DECODES at once, past them 429: the memory of uploads stays bounded.
MAX_DECODED_BYTES = 64 << 20
MAX_CONCURRENT_DECODES = 2
SERVER_HEADER = "digit-recognizer"
LOG_EVERY_S = 10.0  # at most one line this often about malformed requests or full connections
REQUEST_TIMEOUT_S = 30.0
SMALL_JSON_BYTES = 64 * 1024  # the repository routes' bodies: {"ready": true}, {"parameters"}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # a model load or unload that cannot be done
}
_MAX_BODY = web.AppKey("max_body", int)
_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"
# Triton's binary tensor data extension: the JSON's length in bytes; raw tensors follow it.
INFERENCE_HEADER = "Inference-Header-Content-Length"


def build_app(
    plane: DataPlane, max_body: int, token: str | None, workers: int = 1
) -> web.Application:
    max_size = max(max_body, MAX_UPLOAD_BYTES)
    middlewares = [_bearer_token(token)] if token else []
    app = web.Application(
        client_max_size=max_size,
        middlewares=[_in_progress, _json_errors, *middlewares, _body_rules],
    )
    app[_MAX_BODY] = max_size
    app.on_response_prepare.append(_server_header)
    routes = _Routes(plane, workers)
    app.router.add_get("/", routes.page)
    app.router.add_get("/favicon.ico", routes.icon)
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_get("/v2", routes.observed("http_server_metadata", routes.server_metadata))
    post = functools.partial(app.router.add_post, expect_handler=_expect_within_limit)
    post("/v2/repository/index", routes.observed("http_index", routes.index))
    post("/v2/repository/models/{name}/load", routes.observed("http_load", routes.load))
    post("/v2/repository/models/{name}/unload", routes.observed("http_unload", routes.unload))
    # Before /v2/models/{name}, which "stats" would match too (as in Triton).
    app.router.add_get("/v2/models/stats", routes.observed("http_statistics", routes.statistics))
    for prefix in (_MODEL, _VERSION):
        app.router.add_get(prefix, routes.observed("http_model_metadata", routes.metadata))
        app.router.add_get(
            f"{prefix}/ready", routes.observed("http_model_ready", routes.model_ready)
        )
        app.router.add_get(f"{prefix}/config", routes.observed("http_model_config", routes.config))
        app.router.add_get(f"{prefix}/stats", routes.observed("http_statistics", routes.statistics))
        post(f"{prefix}/infer", routes.observed("http_infer", routes.infer))
    post("/v1/classify", routes.observed("http_classify", routes.classify_picture))
    post("/v1/read", routes.observed("http_read", routes.read_picture))
    app.on_cleanup.append(routes.close_readers)
    return app


Route = Callable[[Call, web.Request], Awaitable[dict[str, Any] | list[Any] | web.Response]]
T = TypeVar("T")


class _Routes:
    def __init__(self, plane: DataPlane, workers: int = 1) -> None:
        self._plane = plane
        self._workers = workers  # --workers: the instance count the model config reports
        self._decodes = asyncio.Semaphore(MAX_CONCURRENT_DECODES)
        self._readers = Readers(MAX_CONCURRENT_DECODES)  # a decode slot each: never waits
        self._json = JsonBodies()  # big infer bodies parsed in a worker process

    def observed(self, method: str, route: Route) -> Callable[[web.Request], Awaitable[Any]]:
        """The route as one observed data-plane call, answered as JSON (or as the response
        the route made: binary tensors)."""

        async def handle(request: web.Request) -> web.Response:
            try:
                body = await self._plane.observed(method, route, request, carrier=_traced(request))
            except CallFailed as failed:
                status = failed.status
                return web.json_response(
                    {"error": status.message}, status=_HTTP_STATUS.get(status.code, 500)
                )
            if isinstance(body, web.Response):
                return body
            return web.json_response(body)

        return handle

    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("digit_recognizer.server").joinpath("static/index.html")
        return web.Response(text=html.read_text(), content_type="text/html")

    async def icon(self, request: web.Request) -> web.Response:
        svg = resources.files("digit_recognizer.server").joinpath("static/favicon.svg")
        return web.Response(text=svg.read_text(), content_type="image/svg+xml")

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = not self._plane.draining
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, call: Call, request: web.Request) -> dict[str, Any]:
        return {
            "name": oi.SERVER_NAME,
            "version": oi.server_version(),
            "extensions": list(oi.EXTENSIONS),
        }

    async def index(self, call: Call, request: web.Request) -> list[dict[str, str]]:
        body = await self._json_body(request) if request.can_read_body else {}
        statuses = self._plane.statuses(ready_only=bool(body.get("ready", False)))
        return [
            {"name": s.model, "version": s.version, "state": s.state, "reason": s.reason}
            for s in statuses
        ]

    async def metadata(self, call: Call, request: web.Request) -> dict[str, Any]:
        call.served = self._plane.resolve(*_model_of(request))
        meta = oi.metadata(self._plane, call.served)
        return {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": [_tensor_json(t) for t in meta.inputs],
            "outputs": [_tensor_json(t) for t in meta.outputs],
        }

    async def model_ready(self, call: Call, request: web.Request) -> web.Response:
        """200 when ready, else 400 as Triton answers (its clients read the status alone:
        tritonclient's is_model_ready, kserve's), 404 for a model never heard of; the body
        is always {"name", "ready"}."""
        name, version = _model_of(request)
        if self._plane.is_served(name, version):
            call.served = self._plane.resolve(name, version)
            ready = not self._plane.draining
            return web.json_response({"name": name, "ready": ready}, status=200 if ready else 400)
        known = any(
            s.model == name and (not version or s.version == version)
            for s in self._plane.statuses()
        )  # a version that failed to load, or one not served any more
        return web.json_response({"name": name, "ready": False}, status=400 if known else 404)

    async def config(self, call: Call, request: web.Request) -> dict[str, Any]:
        """Triton's model configuration extension: what the version is served with."""
        call.served = self._plane.resolve(*_model_of(request))
        return oi.as_json(model_config.describe(call.served, workers=self._workers))

    async def statistics(self, call: Call, request: web.Request) -> dict[str, Any]:
        """Triton's statistics extension, this process's figures (statistics.py)."""
        name, version = request.match_info.get("name", ""), request.match_info.get("version", "")
        return oi.as_json(oi.statistics(self._plane, name, version))

    async def infer(self, call: Call, request: web.Request) -> dict[str, Any] | web.Response:
        """JSON tensors, or Triton's binary tensor data: a JSON header of the length in
        INFERENCE_HEADER, then each input with a "binary_data_size" parameter as raw
        little-endian bytes, in order; outputs asked for with "binary_data" (or all, with the
        request's "binary_data_output") go back the same way after the reply's JSON."""
        body, binary = await self._infer_body(request)
        served = self._plane.choose(call, *_model_of(request))
        if body is None:  # Triton's raw binary request: the body is one image, FP32
            body = _raw_binary_request(served, len(binary))
        inputs = body.get("inputs")
        if not isinstance(inputs, list):
            raise InvalidInput('the body needs "inputs": [{"name", "shape", "datatype", "data"}]')
        headers: list[oi.TensorHeader] = []
        values: list[np.ndarray | bytes] = []
        taken = 0  # bytes of `binary` the inputs so far hold
        for item in inputs:
            if not isinstance(item, dict):
                raise InvalidInput("each input must be an object with name, shape, datatype, data")
            name = str(item.get("name", ""))
            headers.append(oi.TensorHeader(name, str(item.get("datatype", "")), _shape(item)))
            size = _parameter(item, "binary_data_size", int)
            if size is None:  # parse_infer made "data" an array already
                values.append(item.get("data", np.empty(0, np.float32)))
                continue
            if "data" in item:
                raise InvalidInput(f"input {cut(name)!r}: give data or binary_data_size, not both")
            if taken + size > len(binary):
                raise InvalidInput(
                    f"input {cut(name)!r}: binary_data_size {size} runs past the end of the "
                    f"{len(binary)} bytes of binary data after the JSON ({INFERENCE_HEADER})"
                )
            values.append(binary[taken : taken + size])
            taken += size
        if taken != len(binary):
            raise InvalidInput(
                f"{len(binary)} bytes of binary data follow the JSON, but the inputs' "
                f"binary_data_size add up to {taken}"
            )
        outputs = body.get("outputs") or []
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise InvalidInput('"outputs" must be a list of objects like {"name": "probabilities"}')
        wanted = [str(output.get("name", "")) for output in outputs]
        all_binary = bool(_parameter(body, "binary_data_output", bool))
        binary_out = {str(o.get("name", "")): _parameter(o, "binary_data", bool) for o in outputs}
        images = oi.check_request(served, headers, wanted)
        max_images = self._plane.limits.max_images_per_request
        data, field = values[0], "inputs[0].data"
        if isinstance(data, bytes):
            field = "inputs[0].parameters.binary_data_size"
            data = oi.raw_values(field, headers[0], images, data)
        pixels = oi.to_pixels(field, images, data, max_images, headers[0].datatype)
        result = await self._plane.classify(served, pixels, REQUEST_TIMEOUT_S)
        tensors, blobs = [], []
        for header, array in oi.outputs(served, result, wanted):
            as_binary = binary_out.get(header.name)
            if as_binary if as_binary is not None else all_binary:
                blobs.append(oi.raw_bytes(header, array))
                parameters = {"binary_data_size": len(blobs[-1])}
                tensors.append({**_tensor_json(header), "parameters": parameters})
            else:
                tensors.append({**_tensor_json(header), "data": array.ravel().tolist()})
        answer = {
            "model_name": served.name,
            "model_version": result.version,
            "id": str(body.get("id", "")),
            "outputs": tensors,
        }
        if not blobs:
            return answer
        head = json.dumps(answer).encode()
        return web.Response(
            body=b"".join([head, *blobs]),
            content_type="application/octet-stream",
            headers={INFERENCE_HEADER: str(len(head))},
        )

    async def classify_picture(self, call: Call, request: web.Request) -> dict[str, Any]:
        name, asked, pixels = await self._decoded(request, to_mnist)
        # Chosen only now: a version retired during the decode is never handed the picture.
        served = self._plane.choose(call, *asked)
        result = await self._plane.classify(
            served, pixels.reshape(1, PIXELS_PER_IMAGE), REQUEST_TIMEOUT_S
        )
        return {
            "name": name,
            **_prediction_json(served, result, 0),
            "labels": list(served.labels),
            "model_version": result.version,
            "pixels": [round(float(v), 3) for v in pixels],
        }

    async def read_picture(self, call: Call, request: web.Request) -> web.Response:
        """A picture of a number: its digits found left to right, classified in one run.
        Found in a worker process (reader.py): at most the per-request image limit of pieces
        (400 naming it), within READ_TIMEOUT_S (504), stopped when the caller disconnects."""
        max_pieces = self._plane.limits.max_images_per_request

        def caller_gone() -> bool:
            return request.transport is None or request.transport.is_closing()

        async def find(data: bytes, name: str, max_decoded_bytes: int) -> Found:
            return await self._readers.read(data, name, max_decoded_bytes, max_pieces, caller_gone)

        name, asked, found = await self._decoded_by(request, find)
        served = self._plane.choose(call, *asked)
        answers: list[dict[str, Any]] = []
        version = served.version
        chosen: list[int] = []
        reason = found.pieces.not_a_number
        if found.pieces:
            # The pieces and the other ways to cut ambiguous ink, in one run: the reader's
            # rules (reading.choose) pick the cut and say when there is no number.
            asked_pieces = found.pieces.asked()
            stacked = np.stack([piece.pixels for piece in asked_pieces])
            result = await self._plane.classify(served, stacked, REQUEST_TIMEOUT_S)
            version = result.version
            answers = [
                {"box": list(piece.box), **_prediction_json(served, result, row)}
                for row, piece in enumerate(asked_pieces)
            ]
            verdicts = [(answer.get("is_digit"), answer.get("digit_score")) for answer in answers]
            chosen, reason = choose(found.pieces, verdicts)
        # The JSON that json_response would write, with each piece's "pixels" as the worker
        # wrote them: encoding a thousand pieces' 784,000 numbers here held the loop 0.1 s.
        pieces = [
            f'{json.dumps(answers[i])[:-1]}, "pixels": {found.pixels_json[i]}}}' for i in chosen
        ]
        kept = [is_read(reason, answers[i].get("is_digit")) for i in chosen]
        text = "".join(answers[i]["label"] for i, k in zip(chosen, kept, strict=True) if k)
        digits = ", ".join(p for p, k in zip(pieces, kept, strict=True) if k)
        dropped = ", ".join(p for p, k in zip(pieces, kept, strict=True) if not k)
        head = json.dumps({"name": name, "text": text, **({"no_number": reason} if reason else {})})
        head = head[:-1]
        tail = json.dumps({"labels": list(served.labels), "model_version": version})[1:]
        body = f'{head}, "digits": [{digits}], "dropped": [{dropped}], {tail}'
        return web.Response(text=body, content_type="application/json")

    async def close_readers(self, app: web.Application) -> None:
        self._readers.close()
        self._json.close()

    async def _decoded(
        self, request: web.Request, decode: Callable[[bytes, str, int], T]
    ) -> tuple[str, tuple[str, str], T]:
        """(file name, (model, version) asked for, `decode`(picture)): decoded in a thread."""

        async def in_thread(data: bytes, name: str, max_decoded_bytes: int) -> T:
            return await asyncio.to_thread(decode, data, name, max_decoded_bytes)

        return await self._decoded_by(request, in_thread)

    async def _decoded_by(
        self, request: web.Request, decode: Callable[[bytes, str, int], Awaitable[T]]
    ) -> tuple[str, tuple[str, str], T]:
        """(file name, (model, version) asked for, await `decode`(picture, its name, the
        decoded bytes limit)): at most MAX_CONCURRENT_DECODES at once (429 past that)."""
        name, data = await _upload(request)
        asked = request.query.get("model", ""), request.query.get("model_version", "")
        self._plane.resolve(*asked)  # an unknown model is refused before decoding
        if self._decodes.locked():
            raise Overloaded(
                f"{MAX_CONCURRENT_DECODES} pictures are being decoded already; retry after a "
                "back-off"
            )
        async with self._decodes:
            try:
                return name, asked, await decode(data, name, MAX_DECODED_BYTES)
            except ImageError as exc:
                raise InvalidInput(str(exc)) from None

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        """A small JSON object (the repository routes'): at most SMALL_JSON_BYTES, parsed
        here (a millisecond or two)."""
        data = await _read_body(request, SMALL_JSON_BYTES)
        body = loads(data, request.charset)
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object")
        return body

    async def _infer_body(self, request: web.Request) -> tuple[dict[str, Any] | None, bytes]:
        """(the JSON object, the binary data after it); without INFERENCE_HEADER the body is
        all JSON, with it 0 the body is all binary (None: Triton's raw binary request)."""
        max_images = self._plane.limits.max_images_per_request
        limit = max_json_bytes(max_images)  # the JSON that many images can take
        declared = request.headers.get(INFERENCE_HEADER)
        if declared is None:
            data = await _read_body(request, limit)
            return await self._json.parse(data, request.charset, max_images), b""
        length = declared.strip()
        if not (length.isascii() and length.isdigit() and len(length) <= 18):
            raise InvalidInput(
                f"{INFERENCE_HEADER} must be the JSON's length in bytes, got {declared[:40]!r}"
            )
        if int(length) > limit:
            raise InvalidInput(
                f"{INFERENCE_HEADER} is {length}, over the {limit} bytes of JSON that "
                f"{max_images} images can take"
            )
        data = await _read_body(request, None)  # within the app's limit on bodies
        if int(length) > len(data):
            raise InvalidInput(
                f"{INFERENCE_HEADER} is {length} but the body holds {len(data)} bytes"
            )
        if int(length) == 0:
            return None, data
        body = await self._json.parse(data[: int(length)], request.charset, max_images)
        return body, data[int(length) :]

    # Explicit model control (Triton's model repository extension), behind the token.

    async def load(self, call: Call, request: web.Request) -> dict[str, Any]:
        parameters = await self._control_parameters(request)
        await self._plane.load_model(request.match_info["name"], parameters)
        return {}

    async def unload(self, call: Call, request: web.Request) -> dict[str, Any]:
        parameters = await self._control_parameters(request)
        await self._plane.unload_model(request.match_info["name"], parameters)
        return {}

    async def _control_parameters(self, request: web.Request) -> list[str]:
        """The names in the body's optional {"parameters": {...}} (an empty body is none)."""
        body = await self._json_body(request) if request.can_read_body else {}
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput('"parameters" must be an object')
        return list(parameters)


async def _read_body(request: web.Request, limit: int | None) -> bytes:
    """The whole body, refused (400) past `limit` bytes: before it is read when its length is
    declared. None: the app's limit (client_max_size) alone."""
    if limit is not None and (request.content_length or 0) > limit:
        raise InvalidInput(_too_big(request.content_length or 0, limit))
    async with _reading_body(request):
        data = await request.read()
    if limit is not None and len(data) > limit:
        raise InvalidInput(_too_big(len(data), limit))
    return data


def _too_big(size: int, limit: int) -> str:
    return f"the body is {size} bytes, over the {limit} this route takes; " + (
        BINARY_HINT if limit > SMALL_JSON_BYTES else "this route takes a small JSON object"
    )


@contextlib.asynccontextmanager
async def _reading_body(request: web.Request) -> AsyncIterator[None]:
    """Reading and parsing a body within BODY_TIMEOUT_S; what goes wrong is the caller's
    InvalidInput (400), never a 500."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            yield
    except TimeoutError:
        raise InvalidInput(f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[_MAX_BODY]
        raise InvalidInput(f"the body is larger than {limit} bytes") from None
    except (RequestPayloadError, ConnectionError) as exc:
        raise InvalidInput(f"the body was cut off ({exc})") from None


def _raw_binary_request(served: ServedVersion, size: int) -> dict[str, Any]:
    """Triton's raw binary request (INFERENCE_HEADER 0, no JSON): the body is the one input
    of a batch of one, in the model's datatype (FP32); every output goes back binary."""
    return {
        "inputs": [
            {
                "name": served.model.input_name,
                "datatype": oi.FP32,
                "shape": [1, PIXELS_PER_IMAGE],
                "parameters": {"binary_data_size": size},
            }
        ],
        "parameters": {"binary_data_output": True},
    }


def _parameter(item: dict[str, Any], key: str, kind: type[int] | type[bool]) -> Any:
    """`item`'s parameters[key]: a bool, or a whole number >= 0 for int; None when unset."""
    parameters = item.get("parameters")
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise InvalidInput(f'"parameters" must be an object, got {json.dumps(parameters)[:80]}')
    value = parameters.get(key)
    if value is None or (kind is bool and isinstance(value, bool)):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    wanted = "true or false" if kind is bool else "a whole number of bytes >= 0"
    raise InvalidInput(f"parameter {key!r} must be {wanted}, got {json.dumps(value)[:80]}")


def _prediction_json(served: ServedVersion, result: Classified, row: int) -> dict[str, Any]:
    """One image's answer as the HTTP routes give it; is_digit and digit_score only when the
    model has a not-a-digit detector."""
    probabilities = result.probabilities[row]
    digit = int(probabilities.argmax())
    answer: dict[str, Any] = {
        "digit": digit,
        "label": served.labels[digit],
        "confidence": float(probabilities[digit]),
        "probabilities": [float(p) for p in probabilities],
    }
    if result.digit_scores is not None:
        answer["digit_score"] = float(result.digit_scores[row])
    if result.is_digit is not None:
        answer["is_digit"] = bool(result.is_digit[row])
    return answer


def _shape(item: dict[str, Any]) -> tuple[int, ...]:
    shape = item.get("shape", [])
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and abs(d) < 2**31 for d in shape
    ):
        name = cut(str(item.get("name", "")))
        raise InvalidInput(f"input {name!r}: shape must be a list of integers")
    return tuple(shape)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER  # not aiohttp's name and version


@web.middleware
async def _in_progress(request: web.Request, handler: Any) -> web.StreamResponse:
    """Counts the connection's requests in progress: such a connection is never the one
    closed to make room for a new one (_Connections)."""
    connection = request.protocol
    if not isinstance(connection, _Connection):
        return await handler(request)
    connection.requests += 1
    try:
        return await handler(request)
    finally:
        connection.requests -= 1
        connection.waiting()


_JSON_ROUTES = ("/infer", "/v2/repository/index")
# What clients send for a JSON body without being told: curl -d, aiohttp/requests bytes.
_UNDECLARED = {"application/octet-stream", "application/x-www-form-urlencoded", "text/plain"}


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (404 no such route, 405 wrong method) in JSON like all others."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        path = cut(request.path)  # up to 8 KB of the caller's
        message = {404: f"no route {path}", 405: f"{request.method} is not allowed on "
                   f"{path}"}.get(exc.status, exc.reason)  # fmt: skip
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return web.json_response({"error": message}, status=exc.status, headers=allow)


@web.middleware
async def _body_rules(request: web.Request, handler: Any) -> web.StreamResponse:
    """Before any body is read: 413 for a declared length over the limit (so `Expect:
    100-continue` gets no "100 Continue"), 415 for compressed bodies and non-JSON types on
    JSON routes."""
    if (refusal := _over_limit(request)) is not None:
        return refusal
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return web.json_response(
            {"error": f"Content-Encoding {encoding!r} is not accepted; send the body as is"},
            status=415,
        )
    if (
        request.method == "POST"
        and request.path.endswith(_JSON_ROUTES)
        and request.content_type != "application/json"
        and not request.content_type.endswith("+json")
        and request.content_type not in _UNDECLARED
    ):
        return web.json_response(
            {"error": f"this route takes application/json, not {request.content_type}"},
            status=415,
        )
    return await handler(request)


def _over_limit(request: web.Request) -> web.Response | None:
    limit = request.app[_MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        return web.json_response(
            {"error": f"the body is {request.content_length} bytes, over the {limit} limit"},
            status=413,
        )
    return None


async def _expect_within_limit(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue`: say "continue" only to a body this server would take."""
    if (refusal := _over_limit(request)) is not None:
        return refusal
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers['Expect']}")
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim response is not part of the body
    return None


def _traced(request: web.Request) -> HttpCall:
    """What the call's trace span says of the request (OpenTelemetry's http.* conventions)."""
    route = request.match_info.route.resource
    template = route.canonical if route is not None else cut(request.path)
    return HttpCall(request.headers, request.method, template, _http_status)


def _http_status(code: str) -> int:
    """The HTTP status this front answers a call that ended with gRPC status `code`."""
    return 200 if code == "OK" else _HTTP_STATUS.get(grpc.StatusCode[code], 500)


def _model_of(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _tensor_json(tensor: oi.TensorHeader) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _bearer_token(token: str) -> Any:
    """Everything but the open routes (security.OPEN_ROUTES, the same for gRPC) needs it."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if not is_open_http(request.method, request.path):
            # surrogateescape: a header that is not UTF-8 is a wrong token, not a crash
            presented = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(presented, expected):
                return web.json_response({"error": UNAUTHENTICATED_MESSAGE}, status=401)
        return await handler(request)

    return check


async def _upload(request: web.Request) -> tuple[str, bytes]:
    """The picture: a multipart form field (any name) or the raw request body."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await _read_upload(request)
    except TimeoutError:
        raise InvalidInput(f"the picture did not arrive within {BODY_TIMEOUT_S:.0f} s") from None


async def _read_upload(request: web.Request) -> tuple[str, bytes]:
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
    except InvalidInput:
        raise
    except (RequestPayloadError, ConnectionError) as exc:
        raise InvalidInput(f"the upload was cut off ({exc})") from None
    except (ValueError, LookupError, AssertionError, RuntimeError) as exc:
        # aiohttp's multipart reader: no boundary, not multipart, unterminated, absurd boundary
        raise InvalidInput(f"cannot read the upload as a form ({first_line(exc, 200)})") from None
    if not data:
        raise InvalidInput("no picture received: POST an image file (multipart or raw body)")
    return name, bytes(data)


@dataclass(frozen=True)
class HttpLimits:
    """What HTTP connections may hold (--http-header-timeout, --http-max-connections)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000


class _Throttled:
    """One kind of WARNING at most every LOG_EVERY_S seconds, the next line counting those
    left out: a flood of bad requests costs a line now and then, not a line each."""

    def __init__(self) -> None:
        self._next = 0.0
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        if self._left_out:
            message += f" ({self._left_out} more like it in the last {LOG_EVERY_S:g} s)"
        log.warning(message, *args)
        self._next, self._left_out = now + LOG_EVERY_S, 0


class _Connections:
    """The open HTTP connections, at most `limit`. A new one past it closes the one that has
    waited longest for a request's head (idle since its last response, or still sending a
    head slowly); when every one is in the middle of a request, the new one is closed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # A set ordered by the time each began to wait for a request (moved to the end when
        # a request ends): the first one not in a request is the one to close.
        self._open: dict[_Connection, None] = {}
        self.malformed = _Throttled()
        self._full = _Throttled()

    def __len__(self) -> int:
        return len(self._open)

    @property
    def busy(self) -> int:
        """Connections in the middle of a request."""
        return sum(1 for connection in self._open if connection.requests)

    def admit(self, new: _Connection) -> bool:
        if len(self._open) >= self.limit:
            oldest = next((c for c in self._open if not c.requests), None)
            if oldest is None:
                self._full.warning(
                    "%d HTTP connections open (--http-max-connections), each in the middle "
                    "of a request: a new one is closed",
                    self.limit,
                )
                return False
            self._full.warning(
                "%d HTTP connections open (--http-max-connections): closing the one waiting "
                "longest for a request (%.1f s)",
                self.limit,
                time.monotonic() - oldest.waiting_since,
            )
            self.discard(oldest)
            oldest.force_close()
        self._open[new] = None
        return True

    def discard(self, connection: _Connection) -> None:
        self._open.pop(connection, None)

    def waiting(self, connection: _Connection) -> None:
        """`connection` begins to wait for a request again: it goes last."""
        if connection in self._open:
            del self._open[connection]
            self._open[connection] = None


class _Connection(RequestHandler):
    """aiohttp's handler of one connection, with this server's limits. Its keep-alive timer,
    which closes a connection that is waiting for a request when it fires, runs from the
    opening and from each response: set to the header timeout, it is one. A request that
    aiohttp cannot parse (a 64 KB URL or header, a bad request line) is answered like every
    other error, in JSON with this server's Server header, and logged as one WARNING line
    (throttled) instead of a traceback at ERROR each."""

    def __init__(
        self, manager: web.Server, connections: _Connections, header_timeout_s: float
    ) -> None:
        super().__init__(
            manager,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=header_timeout_s,
            **_HANDLER_OPTIONS,
        )
        self.requests = 0  # in progress (_in_progress counts them)
        self.waiting_since = time.monotonic()  # for a request's head
        self._connections = connections

    def waiting(self) -> None:
        """A request ended: the connection waits for the next from now."""
        self.waiting_since = time.monotonic()
        self._connections.waiting(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._connections.admit(self):
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.discard(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # a route's bug (or its timeout, 504): logged in full, as aiohttp does
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = "internal error; the server logged the details"
        else:  # the request could not be parsed: the caller's, one line
            reason = ((message or "").strip() or "bad request").splitlines()[0][:200]
            self._connections.malformed.warning(
                "malformed HTTP request from %s: %s", request.remote, reason
            )
            text = f"malformed HTTP request: {reason}"
        if request.writer.output_size > 0:  # as aiohttp's: too late for an answer
            raise ConnectionError("the response is under way; cannot send an error instead")
        response = web.json_response(
            {"error": text}, status=status, headers={"Server": SERVER_HEADER}
        )
        response.force_close()
        return response


# What aiohttp's runner and every connection's handler are made with.
_HANDLER_OPTIONS: dict[str, Any] = {"access_log": None, "auto_decompress": False}


class HttpFront:
    """Owns the aiohttp runner; started and stopped with the gRPC server. `ssl_context`: HTTPS
    (with client certificates when it requires them), else plain HTTP. Connections are made
    here (_Connection), with `limits`."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        reuse_port: bool,
        ssl_context: ssl.SSLContext | None = None,
        limits: HttpLimits = HttpLimits(),
    ) -> None:
        self._runner = web.AppRunner(app, **_HANDLER_OPTIONS)
        self._host = host.strip("[]")
        self._port = port
        self._reuse_port = reuse_port  # --workers N share the HTTP port like the gRPC one
        self._ssl_context = ssl_context
        self._limits = limits
        self._listener: asyncio.AbstractServer | None = None
        self.connections = _Connections(limits.max_connections)
        self.port = 0

    @property
    def tls(self) -> bool:
        return self._ssl_context is not None

    def _listening_socket(self) -> socket.socket:
        """One socket, so port 0 means one port. "[::]" (the default) means every interface:
        a dual-stack socket where the kernel has one (asyncio's own "::" is IPv6 only and
        refuses 127.0.0.1; host None would open one socket per family, each on its own port
        when the port is 0), else IPv4's 0.0.0.0."""
        if self._host in ("", "::"):
            if socket.has_dualstack_ipv6():
                return socket.create_server(
                    ("::", self._port),
                    family=socket.AF_INET6,
                    dualstack_ipv6=True,
                    reuse_port=self._reuse_port,
                )
            return socket.create_server(("0.0.0.0", self._port), reuse_port=self._reuse_port)
        family = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server(
            (self._host, self._port), family=family, reuse_port=self._reuse_port
        )

    async def start(self) -> None:
        await self._runner.setup()
        server = self._runner.server
        assert server is not None  # made by setup()
        sock = self._listening_socket()
        self.port = sock.getsockname()[1]
        timeout_s = self._limits.header_timeout_s

        def connection() -> _Connection:
            return _Connection(server, self.connections, timeout_s)

        # aiohttp's SockSite, with our connections; a TLS handshake gets the header timeout.
        self._listener = await asyncio.get_running_loop().create_server(
            connection,
            sock=sock,
            ssl=self._ssl_context,
            ssl_handshake_timeout=timeout_s if self._ssl_context else None,
        )

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()
