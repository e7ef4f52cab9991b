"""`DigitClient` (blocking) and `AsyncDigitClient` (asyncio): the service from Python.

    with DigitClient("localhost:50051") as client:
        print(client.classify_image("seven.png").digit)

Both share everything but the calls themselves: input normalisation, request encoding,
reply decoding and the channels' service config, which carries the retry policy (UNAVAILABLE
only: retrying RESOURCE_EXHAUSTED at once is what turns an overload into an outage),
round-robin balancing over every address a `dns:///host:port` target resolves to, and
client-side health checking, so that a draining replica stops getting calls at once.

Calls go over a pool of connections (pool.py): by default one to each process of a
`--workers N` server, each call on the connection with the fewest calls in progress;
`connections=1` keeps one connection, as a plain gRPC channel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digit_recognizer.client.errors import DigitClientError, InvalidInput, from_rpc_error
from digit_recognizer.client.pool import (
    AUTO,
    Connections,
    Pool,
    Slot,
    cover_steps,
    parse_connections,
)
from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
from digit_recognizer.protos.contract import IMAGE_SIDE, PIXELS_PER_IMAGE

# numpy, Pillow (images) and scipy (reading) load where pictures and arrays are handled, not
# here: a health probe or a model-info call costs grpc's import and nothing more.
if TYPE_CHECKING:
    import numpy as np

    from digit_recognizer.client.images import ImageSource
    from digit_recognizer.client.reading import Reading

SERVICE = "digits.v1.DigitClassifier"
DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_CHUNK = 256  # images per request when the server's own limit is not known yet
PROBE_TIMEOUT_S = 5.0  # asking a new connection which server process it reached
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    # Client-side health checking: a replica that turns NOT_SERVING (draining after SIGTERM)
    # stops getting new calls within milliseconds, while it still finishes what it has.
    "healthCheckConfig": {"serviceName": SERVICE},
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


@dataclass(frozen=True)
class Candidate:
    digit: int
    label: str
    probability: float


@dataclass(frozen=True)
class Telemetry:
    batch_size: int
    batches: int
    queue_us: int
    compute_us: int
    worker: int = 0  # the server process that answered, of `workers` (0: not told)
    workers: int = 0


@dataclass(frozen=True)
class Prediction:
    digit: int
    label: str
    confidence: float
    probabilities: tuple[float, ...]
    top: tuple[Candidate, ...]
    model_version: str
    telemetry: Telemetry
    # Whether the image looks like one digit at all, and the calibrated score behind it;
    # None when the served model has no not-a-digit detector.
    is_digit: bool | None = None
    digit_score: float | None = None

    @property
    def looks_like_a_digit(self) -> bool:
        """False only when the model says so: models without a detector never do."""
        return self.is_digit is not False

    def to_dict(self) -> dict[str, Any]:
        return {
            "digit": self.digit,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "probabilities": [round(p, 6) for p in self.probabilities],
            **({"top": [c.__dict__ for c in self.top]} if self.top else {}),
            **({"is_digit": self.is_digit} if self.is_digit is not None else {}),
            **({"digit_score": round(self.digit_score, 6)} if self.digit_score is not None else {}),
            "model_version": self.model_version,
        }


@dataclass(frozen=True)
class Credentials:
    """TLS (server-verified), mutual TLS (with a client key and certificate), bearer token."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    token: str | None = None
    tls: bool = False

    @property
    def secure(self) -> bool:
        return self.tls or any((self.root_certificates, self.private_key, self.certificate_chain))


def as_pixels(images: Any) -> np.ndarray:
    """Arrays shaped (784,), (28, 28), (N, 784) or (N, 28, 28); uint8 0-255 or float 0-1.

    Returns (N, 784), uint8 or float32, ready for the wire.
    """
    import numpy as np

    array = np.asarray(images)
    if array.dtype == object or array.size == 0:
        raise InvalidInput(
            f"expected numbers shaped (784,), (28, 28), (N, 784) or (N, 28, 28); "
            f"got {array.dtype} {array.shape}"
        )
    shape = array.shape
    if shape in ((PIXELS_PER_IMAGE,), (IMAGE_SIDE, IMAGE_SIDE)):
        array = array.reshape(1, PIXELS_PER_IMAGE)
    elif array.ndim == 2 and shape[1] == PIXELS_PER_IMAGE:
        pass
    elif array.ndim == 3 and shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
        array = array.reshape(shape[0], PIXELS_PER_IMAGE)
    else:
        raise InvalidInput(
            f"expected an image shaped (784,) or (28, 28), or a batch shaped (N, 784) or "
            f"(N, 28, 28); got shape {shape}"
        )
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise InvalidInput(f"expected uint8 0-255 or float 0-1 pixels, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise InvalidInput("integer pixels must be in 0-255")
        return array.astype(np.uint8)
    floats = array.astype(np.float32)
    bad = ~((floats >= 0) & (floats <= 1))
    if bad.any():
        image, pixel = map(int, np.argwhere(bad)[0])
        raise InvalidInput(
            f"image {image}, pixel {pixel} is {floats[image, pixel]}; float pixels must be in "
            "[0, 1] (0 = background, 1 = ink); pass uint8 for 0-255 values"
        )
    return floats


def encode(pixels: np.ndarray, top_k: int = 0, request_id: str = "") -> digits_pb2.ClassifyRequest:
    if not isinstance(top_k, int) or top_k < 0:  # protobuf's own error would be a ValueError
        raise InvalidInput(f"top_k must be a whole number >= 0, got {top_k!r}")
    if pixels.dtype.name == "uint8":  # as_pixels gives uint8 or float32
        return digits_pb2.ClassifyRequest(
            request_id=request_id, pixels_u8=pixels.tobytes(), top_k=top_k
        )
    return digits_pb2.ClassifyRequest(
        request_id=request_id, pixels_f32le=pixels.astype("<f4").tobytes(), top_k=top_k
    )


def decode(reply: digits_pb2.ClassifyResponse) -> list[Prediction]:
    told = reply.telemetry
    telemetry = Telemetry(
        told.batch_size, told.batches, told.queue_us, told.compute_us, told.worker, told.workers
    )
    return [
        Prediction(
            digit=p.digit,
            label=p.label,
            confidence=p.confidence,
            probabilities=tuple(p.probabilities),
            top=tuple(Candidate(c.digit, c.label, c.probability) for c in p.top),
            model_version=reply.model_version,
            telemetry=telemetry,
            is_digit=p.is_digit if p.HasField("is_digit") else None,
            digit_score=p.digit_score if p.HasField("digit_score") else None,
        )
        for p in reply.predictions
    ]


def _propagator() -> Any:
    """OpenTelemetry's propagate module when the program uses OpenTelemetry (optional: the
    base install does not include it), else None. Without opentelemetry.context imported no
    span can be current, so there is nothing to propagate and nothing worth importing."""
    if "opentelemetry.context" not in sys.modules:
        return None
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover - a partial install
        return None
    return propagate


def _chunks(pixels: np.ndarray, size: int) -> list[np.ndarray]:
    return [pixels[i : i + size] for i in range(0, len(pixels), size)]


def _channel_options(extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        *extra,
    ]


def _channel_credentials(credentials: Credentials) -> grpc.ChannelCredentials | None:
    if not credentials.secure:
        return None
    channel = grpc.ssl_channel_credentials(
        credentials.root_certificates, credentials.private_key, credentials.certificate_chain
    )
    if credentials.token:
        return grpc.composite_channel_credentials(
            channel, grpc.access_token_call_credentials(credentials.token)
        )
    return channel


def _metadata(
    credentials: Credentials, metadata: Sequence[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    # On a plaintext channel gRPC refuses call credentials, so the token travels as metadata.
    if credentials.token and not credentials.secure:
        return (("authorization", f"Bearer {credentials.token}"), *metadata)
    return tuple(metadata)


def _open_channel(
    module: Any, target: str, secure: grpc.ChannelCredentials | None, options: list[Any]
) -> Any:
    if secure:
        return module.secure_channel(target, secure, options)
    return module.insecure_channel(target, options)


def _slot_opener(
    module: Any,
    target: str,
    secure: grpc.ChannelCredentials | None,
    options: list[Any],
    connections: Connections,
) -> Any:
    """Opens the pool's channels. One pinned connection is a plain channel, as before the
    pool; several each get a subchannel pool of their own, so each holds its own TCP
    connection (gRPC otherwise shares one between channels with the same settings)."""
    if connections != 1:
        options = [*options, ("grpc.use_local_subchannel_pool", 1)]

    def open_slot(_number: int) -> Slot:
        channel = _open_channel(module, target, secure, options)
        return Slot(channel, digits_pb2_grpc.DigitClassifierStub(channel))

    return open_slot


def _probe_channel(
    module: Any, target: str, secure: grpc.ChannelCredentials | None, options: list[Any]
) -> Any:
    """The channel for health(): it does no client-side health checking itself, since
    through the call channels a draining server is unreachable rather than NOT_SERVING."""
    return _open_channel(module, target, secure, [*options, ("grpc.inhibit_health_checking", 1)])


def _answer(info: digits_pb2.ModelInfo) -> tuple[int, int]:
    return info.worker, info.workers


class _Base:
    def __init__(
        self,
        target: str,
        timeout: float | None,
        credentials: Credentials | None,
        metadata: Sequence[tuple[str, str]],
        options: Sequence[tuple[str, Any]],
        model: str,
        model_version: str,
        connections: Connections | str,
    ) -> None:
        self.connections: Connections = parse_connections(connections)
        self.target = target
        self.timeout = timeout
        self.model = model  # "" = the server's default model
        self.model_version = model_version  # "" = its latest served version
        self._credentials = credentials or Credentials()
        self._fixed_metadata = _metadata(self._credentials, metadata)
        self._options = _channel_options(options)
        self._chunk: int | None = None

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The call's metadata, with the caller's trace context (W3C traceparent) when
        OpenTelemetry is installed and a span is current: the server continues the trace."""
        propagate = _propagator()
        if propagate is None:
            return self._fixed_metadata
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return (*self._fixed_metadata, *carrier.items()) if carrier else self._fixed_metadata

    def _error(self, error: grpc.RpcError) -> DigitClientError:
        return from_rpc_error(error, self.target)

    def _addressed(self, request: digits_pb2.ClassifyRequest) -> digits_pb2.ClassifyRequest:
        request.model, request.model_version = self.model, self.model_version
        return request

    def _info_request(self) -> digits_pb2.GetModelInfoRequest:
        return digits_pb2.GetModelInfoRequest(model=self.model, model_version=self.model_version)

    _pool: Pool

    @property
    def workers(self) -> int:
        """How many processes the server runs, as it said (0: not heard yet)."""
        return self._pool.workers

    def reached_workers(self) -> tuple[int, ...]:
        """The server processes this client's connections reach, as last heard."""
        return self._pool.reached()

    @property
    def open_connections(self) -> int:
        """Connections that take new calls."""
        return len(self._pool.slots)


class DigitClient(_Base):
    """Blocking client. Thread-safe; reuse one per process (it holds the connections).

    `connections`: "auto" (one connection to each process of a `--workers N` server, opened
    in the background from the first call on; `connect()` waits for them), or a fixed count
    (1: one connection, one server process).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: Credentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        model: str = "",
        model_version: str = "",
        connections: Connections | str = AUTO,
    ) -> None:
        super().__init__(
            target, timeout, credentials, metadata, options, model, model_version, connections
        )
        secure = _channel_credentials(self._credentials)
        opener = _slot_opener(grpc, target, secure, self._options, self.connections)
        self._pool = Pool(opener, self.connections, threading.Lock())
        self._probe_channel = _probe_channel(grpc, target, secure, self._options)
        self._covering: threading.Thread | None = None

    def __enter__(self) -> DigitClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for slot in self._pool.take_all():
            slot.channel.close()
        self._probe_channel.close()
        covering = self._covering
        if covering is not None and covering is not threading.current_thread():
            covering.join(PROBE_TIMEOUT_S)

    def connect(self) -> tuple[int, ...]:
        """Open the connections now: with "auto", until one reaches each server process (or
        the tries run out). Returns the processes reached."""
        covering = self._covering
        if covering is not None and covering.is_alive():
            covering.join()
        if self._pool.start_covering():
            self._cover()
        return self._pool.reached()

    def classify(self, pixels: Any, *, top_k: int = 0) -> Prediction:
        """One image: (784,) or (28, 28), uint8 0-255 or float 0-1."""
        array = as_pixels(pixels)
        if len(array) != 1:
            raise InvalidInput(f"classify takes one image, got {len(array)}; use classify_many")
        return self._call(encode(array, top_k))[0]

    def classify_many(self, images: Any, *, top_k: int = 0) -> list[Prediction]:
        """Any number of images; sent in concurrent requests of the server's size limit."""
        pixels = as_pixels(images)
        slots: list[Slot] = []  # released, whatever happens, once the calls are over
        futures: list[Any] = []
        try:
            for chunk in _chunks(pixels, self._chunk_size()):
                slots.append(self._acquire())
                futures.append(
                    slots[-1].stub.Classify.future(
                        self._addressed(encode(chunk, top_k)),
                        timeout=self.timeout,
                        metadata=self._metadata,
                    )
                )
            predictions: list[Prediction] = []
            for slot, future in zip(slots, futures, strict=True):
                reply = future.result()
                self._heard(slot, reply.telemetry)
                predictions.extend(decode(reply))
        except grpc.RpcError as error:
            for future in futures:
                future.cancel()
            raise self._error(error) from None
        finally:
            for slot in slots:
                self._release(slot)
        return predictions

    def classify_image(self, source: ImageSource, *, top_k: int = 0) -> Prediction:
        """A picture (path, bytes, file object or PIL image), preprocessed like MNIST."""
        from digit_recognizer.client.images import to_mnist

        return self.classify(to_mnist(source), top_k=top_k)

    def read(self, source: ImageSource) -> Reading:
        """A picture of a number (a house number, a meter, a year): its digits found left to
        right, then all classified in one request. `Reading.text` is the number. Needs scipy
        (`pip install 'digit-recognizer[read]'`); ImageError says so when it is missing."""
        from digit_recognizer.client.reading import Reading, assemble, find_digits, pixels_u8

        cut = find_digits(source)
        if not cut:
            return Reading((), cut.not_a_number)
        # The pieces and the other ways to cut ambiguous ink: one request, the model decides.
        return assemble(cut, self.classify_many(pixels_u8(cut.asked())))

    def stream(
        self, batches: Iterable[Any], *, top_k: int = 0
    ) -> Iterator[tuple[str, list[Prediction] | DigitClientError]]:
        """ClassifyStream: yields (request_id, predictions or the error for that message)."""

        rejected: list[tuple[str, DigitClientError]] = []

        def requests() -> Iterator[digits_pb2.ClassifyRequest]:
            for index, images in enumerate(batches):
                request = _stream_request(images, top_k, str(index), rejected)
                if request is not None:
                    yield self._addressed(request)

        slot = self._acquire()  # one stream, one connection, for as long as it lasts
        try:
            for reply in slot.stub.ClassifyStream(requests(), metadata=self._metadata):
                yield from _drain(rejected)
                yield _stream_item(reply, self.target)
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            self._release(slot)
        yield from _drain(rejected)

    def model_info(self) -> digits_pb2.ModelInfo:
        slot = self._acquire()
        try:
            info = slot.stub.GetModelInfo(
                self._info_request(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            self._release(slot)
        self._heard(slot, info)
        return info

    def list_models(self) -> digits_pb2.ListModelsResponse:
        """Every model and version the server knows of, READY or UNAVAILABLE (with why)."""
        slot = self._acquire()
        try:
            return slot.stub.ListModels(
                digits_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            self._release(slot)

    def health(self, service: str = "") -> str:
        """ "SERVING", "NOT_SERVING", ... for the whole server ("") or one service."""
        stub = health_pb2_grpc.HealthStub(self._probe_channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _call(self, request: digits_pb2.ClassifyRequest) -> list[Prediction]:
        slot = self._acquire()
        try:
            reply = slot.stub.Classify(
                self._addressed(request), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            self._release(slot)
        self._heard(slot, reply.telemetry)
        return decode(reply)

    def _chunk_size(self) -> int:
        if self._chunk is None:
            self._chunk = self.model_info().batching.max_images_per_request or DEFAULT_CHUNK
        return self._chunk

    # The pool: a slot per call, and covering the server's processes in a thread.

    def _acquire(self) -> Slot:
        if self._pool.first_call:
            self._start_covering()
        return self._pool.acquire()

    def _release(self, slot: Slot) -> None:
        if self._pool.release(slot):  # retired, and its last call just ended
            slot.channel.close()

    def _heard(self, slot: Slot, told: Any) -> None:
        """A reply (its Telemetry, or ModelInfo) said which process answered on `slot`."""
        if self._pool.heard(slot, told.worker, told.workers):
            self._start_covering()

    def _start_covering(self) -> None:
        if self._pool.start_covering():
            self._covering = threading.Thread(
                target=self._cover, name="digit-client-connections", daemon=True
            )
            self._covering.start()

    def _cover(self) -> None:
        """cover_steps with blocking calls: each step's connections asked at once."""
        steps = cover_steps(self._pool)
        try:
            slots = next(steps)
            while True:
                slots = steps.send(self._ask(slots))
        except StopIteration as done:
            for slot in done.value:
                slot.channel.close()
        finally:
            self._pool.covering = False

    def _ask(self, slots: list[Slot]) -> list[tuple[int, int] | None]:
        request = digits_pb2.GetModelInfoRequest()  # the default model: always there
        futures = [
            slot.stub.GetModelInfo.future(request, timeout=PROBE_TIMEOUT_S, metadata=self._metadata)
            for slot in slots
        ]
        answers: list[tuple[int, int] | None] = []
        for future in futures:
            try:
                answers.append(_answer(future.result()))
            except (grpc.RpcError, grpc.FutureCancelledError):
                answers.append(None)
        return answers


class AsyncDigitClient(_Base):
    """asyncio client: `async with AsyncDigitClient(...) as client:`. `connections` as for
    DigitClient."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: Credentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        model: str = "",
        model_version: str = "",
        connections: Connections | str = AUTO,
    ) -> None:
        super().__init__(
            target, timeout, credentials, metadata, options, model, model_version, connections
        )
        secure = _channel_credentials(self._credentials)
        opener = _slot_opener(grpc.aio, target, secure, self._options, self.connections)
        self._pool = Pool(opener, self.connections)
        self._probe_channel = _probe_channel(grpc.aio, target, secure, self._options)
        self._covering: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncDigitClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        slots = self._pool.take_all()
        if self._covering is not None:
            self._covering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._covering
        for slot in slots:
            await slot.channel.close()
        await self._probe_channel.close()

    async def connect(self) -> tuple[int, ...]:
        """Open the connections now: with "auto", until one reaches each server process (or
        the tries run out). Returns the processes reached."""
        if self._covering is not None and not self._covering.done():
            await asyncio.shield(self._covering)
        if self._pool.start_covering():
            await self._cover()
        return self._pool.reached()

    async def classify(self, pixels: Any, *, top_k: int = 0) -> Prediction:
        array = as_pixels(pixels)
        if len(array) != 1:
            raise InvalidInput(f"classify takes one image, got {len(array)}; use classify_many")
        return (await self._call(encode(array, top_k)))[0]

    async def classify_many(self, images: Any, *, top_k: int = 0) -> list[Prediction]:
        pixels = as_pixels(images)
        size = await self._chunk_size()
        calls = [self._call(encode(chunk, top_k)) for chunk in _chunks(pixels, size)]
        results = await asyncio.gather(*calls)
        return [prediction for chunk in results for prediction in chunk]

    async def classify_image(self, source: ImageSource, *, top_k: int = 0) -> Prediction:
        from digit_recognizer.client.images import to_mnist

        pixels = await asyncio.to_thread(to_mnist, source)
        return await self.classify(pixels, top_k=top_k)

    async def read(self, source: ImageSource) -> Reading:
        """A picture of a number: its digits found, then classified in one request."""
        from digit_recognizer.client.reading import Reading, assemble, find_digits, pixels_u8

        cut = await asyncio.to_thread(find_digits, source)
        if not cut:
            return Reading((), cut.not_a_number)
        return assemble(cut, await self.classify_many(pixels_u8(cut.asked())))

    async def stream(
        self, batches: Iterable[Any] | AsyncIterator[Any], *, top_k: int = 0
    ) -> AsyncIterator[tuple[str, list[Prediction] | DigitClientError]]:
        rejected: list[tuple[str, DigitClientError]] = []

        async def requests() -> AsyncIterator[digits_pb2.ClassifyRequest]:
            index = 0
            async for images in _aiter(batches):
                request = _stream_request(images, top_k, str(index), rejected)
                index += 1
                if request is not None:
                    yield self._addressed(request)

        slot = self._acquire()  # one stream, one connection, for as long as it lasts
        try:
            async for reply in slot.stub.ClassifyStream(requests(), metadata=self._metadata):
                for item in _drain(rejected):
                    yield item
                yield _stream_item(reply, self.target)
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            await self._release(slot)
        for item in _drain(rejected):
            yield item

    async def model_info(self) -> digits_pb2.ModelInfo:
        slot = self._acquire()
        try:
            info = await slot.stub.GetModelInfo(
                self._info_request(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            await self._release(slot)
        self._heard(slot, info)
        return info

    async def list_models(self) -> digits_pb2.ListModelsResponse:
        slot = self._acquire()
        try:
            return await slot.stub.ListModels(
                digits_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            await self._release(slot)

    async def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self._probe_channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def _call(self, request: digits_pb2.ClassifyRequest) -> list[Prediction]:
        slot = self._acquire()
        try:
            reply = await slot.stub.Classify(
                self._addressed(request), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            await self._release(slot)
        self._heard(slot, reply.telemetry)
        return decode(reply)

    async def _chunk_size(self) -> int:
        if self._chunk is None:
            info = await self.model_info()
            self._chunk = info.batching.max_images_per_request or DEFAULT_CHUNK
        return self._chunk

    # The pool: a slot per call, and covering the server's processes in a task.

    def _acquire(self) -> Slot:
        if self._pool.first_call:
            self._start_covering()
        return self._pool.acquire()

    async def _release(self, slot: Slot) -> None:
        if self._pool.release(slot):  # retired, and its last call just ended
            await slot.channel.close()

    def _heard(self, slot: Slot, told: Any) -> None:
        """A reply (its Telemetry, or ModelInfo) said which process answered on `slot`."""
        if self._pool.heard(slot, told.worker, told.workers):
            self._start_covering()

    def _start_covering(self) -> None:
        if self._pool.start_covering():
            self._covering = asyncio.get_running_loop().create_task(
                self._cover(), name="digit-client-connections"
            )

    async def _cover(self) -> None:
        """cover_steps with asyncio calls: each step's connections asked at once."""
        steps = cover_steps(self._pool)
        try:
            slots = next(steps)
            while True:
                slots = steps.send(await self._ask(slots))
        except StopIteration as done:
            for slot in done.value:
                await slot.channel.close()
        finally:
            self._pool.covering = False

    async def _ask(self, slots: list[Slot]) -> list[tuple[int, int] | None]:
        request = digits_pb2.GetModelInfoRequest()  # the default model: always there

        async def ask(slot: Slot) -> tuple[int, int] | None:
            try:
                return _answer(
                    await slot.stub.GetModelInfo(
                        request, timeout=PROBE_TIMEOUT_S, metadata=self._metadata
                    )
                )
            except grpc.RpcError:
                return None

        return list(await asyncio.gather(*(ask(slot) for slot in slots)))


def _stream_request(
    images: Any, top_k: int, request_id: str, rejected: list[tuple[str, DigitClientError]]
) -> digits_pb2.ClassifyRequest | None:
    """Bad input is reported for its own message, like a server-side error, and not sent."""
    try:
        return encode(as_pixels(images), top_k, request_id=request_id)
    except InvalidInput as error:
        rejected.append((request_id, error))
        return None


def _drain(
    rejected: list[tuple[str, DigitClientError]],
) -> Iterator[tuple[str, DigitClientError]]:
    while rejected:
        yield rejected.pop(0)


async def _aiter(items: Iterable[Any] | AsyncIterator[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterator):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _stream_item(
    reply: digits_pb2.ClassifyStreamResponse, target: str
) -> tuple[str, list[Prediction] | DigitClientError]:
    if reply.WhichOneof("result") == "error":
        code = next((c for c in grpc.StatusCode if c.value[0] == reply.error.code), None)
        fake = _StatusOnly(code, reply.error.message)
        return reply.request_id, from_rpc_error(fake, target)
    return reply.request_id, decode(reply.response)


class _StatusOnly(grpc.RpcError):
    """A per-message stream error, shaped like an RpcError for `from_rpc_error`."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details
