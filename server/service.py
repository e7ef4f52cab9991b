"""The thin gRPC servicer: parse, submit to the batcher, shape the reply, map errors."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
from digit_recognizer.server import metrics
from digit_recognizer.server.batcher import Batcher, BatchResult
from digit_recognizer.server.errors import (
    InvalidInput,
    NotServing,
    ServingError,
    Status,
    to_status,
)
from digit_recognizer.server.inference import Model
from digit_recognizer.server.validation import parse_request

log = logging.getLogger(__name__)
DRAIN_QUIET_S = 0.25
SERVICE_NAME = digits_pb2.DESCRIPTOR.services_by_name["DigitClassifier"].full_name


@dataclass(frozen=True)
class MalformedMessage:
    """Stands in for a request whose bytes are not a valid protobuf message of its type."""

    type_name: str
    reason: str

    def error(self) -> InvalidInput:
        return InvalidInput(f"the request is not a valid {self.type_name} message ({self.reason})")


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | MalformedMessage]:
    # gRPC turns a deserializer exception into UNKNOWN/INTERNAL; a malformed message is the
    # caller's mistake, so it reaches the handler and becomes INVALID_ARGUMENT there.
    def parse(data: bytes) -> Message | MalformedMessage:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return MalformedMessage(message_type.DESCRIPTOR.full_name, str(exc) or "cannot parse")

    return parse


def add_to_server(service: DigitClassifierService, server: grpc.aio.Server) -> None:
    """Like the generated add_DigitClassifierServicer_to_server, with lenient parsing."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            service.Classify,
            request_deserializer=_lenient(digits_pb2.ClassifyRequest),
            response_serializer=digits_pb2.ClassifyResponse.SerializeToString,
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            service.ClassifyStream,
            request_deserializer=_lenient(digits_pb2.ClassifyRequest),
            response_serializer=digits_pb2.ClassifyStreamResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo,
            request_deserializer=_lenient(digits_pb2.GetModelInfoRequest),
            response_serializer=digits_pb2.ModelInfo.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


@dataclass(frozen=True)
class ServiceLimits:
    max_images_per_request: int
    max_message_bytes: int


class DigitClassifierService(digits_pb2_grpc.DigitClassifierServicer):
    def __init__(self, model: Model, batcher: Batcher, limits: ServiceLimits) -> None:
        self._model = model
        self._batcher = batcher
        self._limits = limits
        self._draining = False
        self._last_arrival = 0.0
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def model(self) -> Model:
        return self._model

    @property
    def limits(self) -> ServiceLimits:
        return self._limits

    @property
    def draining(self) -> bool:
        return self._draining

    def use_model(self, model: Model) -> None:
        """Hot reload: the batcher already runs `model`; model info and labels follow here."""
        self._model = model

    @property
    def active_requests(self) -> int:
        return self._active

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work with UNAVAILABLE; wait up to timeout_s for accepted work to finish.

        The transport stays open meanwhile: a call that reached us gets a clear, retryable
        UNAVAILABLE instead of the CANCELLED that closing the port gives calls not yet handled.
        """
        self._draining = True
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, give_up - loop.time()))
            except TimeoutError:
                return False
            # Calls the transport already holds keep arriving for a moment; only when none has
            # come for a quiet period is it safe to close the port.
            quiet_for = loop.time() - self._last_arrival
            if quiet_for >= DRAIN_QUIET_S or loop.time() >= give_up:
                return self._active == 0
            await asyncio.sleep(min(DRAIN_QUIET_S - quiet_for, max(0.0, give_up - loop.time())))

    async def Classify(
        self, request: digits_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ClassifyResponse:
        started = time.perf_counter()
        try:
            response = await self._classify(request, context)
        except Exception as exc:
            status = self.status_of(exc, "Classify")
            self.observe("Classify", status.code, started)
            await context.abort_with_status(rpc_status.to_status(status.to_rpc_status()))
        self.observe("Classify", grpc.StatusCode.OK, started)
        return response

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[digits_pb2.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[digits_pb2.ClassifyStreamResponse]:
        # Messages are classified concurrently so one stream can fill a batch; replies go out
        # in completion order, each carrying its request_id.
        replies: asyncio.Queue[digits_pb2.ClassifyStreamResponse | None] = asyncio.Queue()

        async def answer(request: digits_pb2.ClassifyRequest) -> None:
            replies.put_nowait(await self._stream_reply(request, context))

        async def read_all() -> None:
            in_flight: set[asyncio.Task[None]] = set()
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await asyncio.gather(*in_flight)
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()

    async def GetModelInfo(
        self, request: digits_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ModelInfo:
        started = time.perf_counter()
        if isinstance(request, MalformedMessage):
            status = self.status_of(request.error(), "GetModelInfo")
            self.observe("GetModelInfo", status.code, started)
            await context.abort_with_status(rpc_status.to_status(status.to_rpc_status()))
        card, limits = self._model.card, self._batcher.limits
        contract = card.input_contract
        info = digits_pb2.ModelInfo(
            name=card.name,
            version=card.version,
            weights_sha256=card.weights_sha256,
            file_sha256=self._model.file_sha256,
            test_accuracy=card.test_accuracy,
            test_loss=card.test_loss,
            labels=list(card.labels),
            dataset=card.dataset,
            created_at=card.created_at,
            input=digits_pb2.InputContract(
                name=self._model.input_name,
                shape=contract.get("shape", [-1, 784]),
                dtype=contract.get("dtype", "float32"),
                layout=contract.get("layout", "28x28 row-major"),
                min_value=contract.get("range", [0.0, 1.0])[0],
                max_value=contract.get("range", [0.0, 1.0])[1],
                background=contract.get("background", 0.0),
            ),
            execution_provider=self._model.provider,
            batching=digits_pb2.BatchingLimits(
                max_batch_size=limits.max_batch_size,
                max_delay_us=limits.max_delay_us,
                max_queue_size=limits.max_queue_size,
                max_images_per_request=self._limits.max_images_per_request,
                max_message_bytes=self._limits.max_message_bytes,
            ),
            training_config_json=json.dumps(card.training_config, sort_keys=True),
        )
        self.observe("GetModelInfo", grpc.StatusCode.OK, started)
        return info

    async def _classify(
        self, request: digits_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ClassifyResponse:
        self._arrived()
        if isinstance(request, MalformedMessage):
            raise request.error()
        self._refuse_if_draining()
        pixels = parse_request(
            request, self._limits.max_images_per_request, self._model.num_classes
        )
        result = await self.classify_pixels(pixels, context.time_remaining())
        return self._response(request, result)

    async def classify_pixels(self, pixels: np.ndarray, remaining: float | None) -> BatchResult:
        """Validated (N, 784) pixels through the batcher, within `remaining` seconds (None: no
        deadline). Every front (gRPC digits.v1, Open Inference Protocol, HTTP) comes here."""
        self._arrived()
        self._refuse_if_draining()
        loop = asyncio.get_running_loop()
        deadline = None if remaining is None else loop.time() + remaining
        self._active += 1
        self._idle.clear()
        metrics.IN_FLIGHT.inc()
        try:
            result = await self._batcher.submit(pixels, deadline)
        finally:
            metrics.IN_FLIGHT.dec()
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        metrics.IMAGES.inc(len(pixels))
        metrics.QUEUE_WAIT.observe(result.queue_us / 1e6)
        return result

    def _arrived(self) -> None:
        self._last_arrival = asyncio.get_running_loop().time()

    def _refuse_if_draining(self) -> None:
        if self._draining:
            raise NotServing("the server is shutting down; retry (on another replica)")

    async def _stream_reply(
        self, request: digits_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ClassifyStreamResponse:
        started = time.perf_counter()
        try:
            response = await self._classify(request, context)
        except Exception as exc:
            status = self.status_of(exc, "ClassifyStream")
            self.observe("ClassifyStream", status.code, started)
            return digits_pb2.ClassifyStreamResponse(
                request_id=getattr(request, "request_id", "")[:128],
                error=digits_pb2.Error(code=status.code.value[0], message=status.message),
            )
        self.observe("ClassifyStream", grpc.StatusCode.OK, started)
        return digits_pb2.ClassifyStreamResponse(request_id=request.request_id, response=response)

    def _response(
        self, request: digits_pb2.ClassifyRequest, result: BatchResult
    ) -> digits_pb2.ClassifyResponse:
        labels = self._model.card.labels
        probabilities = result.outputs
        rows = probabilities.tolist()
        # Plain dicts: protobuf builds nested messages from them ~1.7x faster than from
        # Prediction objects, which counts on 256-image replies.
        predictions = [
            {"digit": digit, "label": labels[digit], "confidence": row[digit], "probabilities": row}
            for digit, row in zip(probabilities.argmax(axis=1).tolist(), rows, strict=True)
        ]
        if request.top_k:
            order = np.argsort(-probabilities, axis=1)[:, : request.top_k].tolist()
            for prediction, row, ranked in zip(predictions, rows, order, strict=True):
                prediction["top"] = [
                    {"digit": k, "label": labels[k], "probability": row[k]} for k in ranked
                ]
        return digits_pb2.ClassifyResponse(
            request_id=request.request_id,
            predictions=predictions,
            model_version=result.version,
            telemetry=digits_pb2.Telemetry(
                batch_size=result.batch_size,
                batches=result.batches,
                queue_us=result.queue_us,
                compute_us=result.compute_us,
            ),
        )

    @staticmethod
    def status_of(exc: BaseException, method: str) -> Status:
        status = to_status(exc)
        if not isinstance(exc, ServingError):  # a bug: the details go to the log only
            log.error("%s failed", method, exc_info=exc)
        elif status.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            metrics.REJECTED.inc()
        return status

    @staticmethod
    def observe(method: str, code: grpc.StatusCode, started: float) -> None:
        count, latency = metrics.request_series(method, code.name)
        count.inc()
        latency.observe(time.perf_counter() - started)
