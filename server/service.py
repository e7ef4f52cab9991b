"""The digits.v1 front: ClassifyRequest -> data plane -> ClassifyResponse, and model info."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable

import grpc
import numpy as np

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
from digit_recognizer.protos.contract import INPUT_CONTRACT
from digit_recognizer.server import rpc
from digit_recognizer.server.dataplane import Call, CallFailed, Classified, DataPlane, ServedVersion
from digit_recognizer.server.validation import parse_request

SERVICE = digits_pb2.DESCRIPTOR.services_by_name["DigitClassifier"]
SERVICE_NAME = SERVICE.full_name
STREAM_WINDOW = rpc.STREAM_WINDOW  # messages of one ClassifyStream read ahead of the replies


class DigitClassifierService(digits_pb2_grpc.DigitClassifierServicer):
    def __init__(self, plane: DataPlane, worker: int = 0, workers: int = 1) -> None:
        """`worker` of `workers`: this process among --workers N, told in every reply and in
        ModelInfo, so a client can hold a connection to each process."""
        self._plane = plane
        self._worker = worker
        self._workers = workers

    def add_to(self, server: grpc.aio.Server) -> None:
        rpc.add_service(self, SERVICE, server)

    async def Classify(
        self, request: digits_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ClassifyResponse:
        return await rpc.answer(
            self._plane, "Classify", context, self._classify, request, context.time_remaining()
        )

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[digits_pb2.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[digits_pb2.ClassifyStreamResponse]:
        # Classified concurrently, replies in completion order each with its request_id, at
        # most STREAM_WINDOW read ahead of the replies written (rpc.windowed).
        def reply(
            request: digits_pb2.ClassifyRequest,
        ) -> Awaitable[digits_pb2.ClassifyStreamResponse]:
            return self._stream_reply(request, context)

        async with contextlib.aclosing(rpc.windowed(request_iterator, reply)) as replies:
            async for response in replies:
                yield response

    async def GetModelInfo(
        self, request: digits_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ModelInfo:
        return await rpc.answer(self._plane, "GetModelInfo", context, self._model_info, request)

    async def ListModels(
        self, request: digits_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ListModelsResponse:
        return await rpc.answer(self._plane, "ListModels", context, self._list_models, request)

    async def _classify(
        self, call: Call, request: digits_pb2.ClassifyRequest, remaining: float | None
    ) -> digits_pb2.ClassifyResponse:
        request = rpc.parsed(request)
        served = self._plane.choose(call, request.model, request.model_version)
        pixels = parse_request(
            request, self._plane.limits.max_images_per_request, len(served.labels)
        )
        result = await self._plane.classify(served, pixels, remaining)
        return _response(request, served, result, self._worker, self._workers)

    async def _stream_reply(
        self, request: digits_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> digits_pb2.ClassifyStreamResponse:
        try:
            response = await self._plane.observed(
                "ClassifyStream",
                self._classify,
                request,
                context.time_remaining(),
                carrier=context.invocation_metadata,
            )
        except CallFailed as failed:
            status = failed.status
            return digits_pb2.ClassifyStreamResponse(
                request_id=getattr(request, "request_id", "")[:128],
                error=digits_pb2.Error(code=status.code.value[0], message=status.message),
            )
        return digits_pb2.ClassifyStreamResponse(request_id=request.request_id, response=response)

    async def _model_info(
        self, call: Call, request: digits_pb2.GetModelInfoRequest
    ) -> digits_pb2.ModelInfo:
        request = rpc.parsed(request)
        served = call.served = self._plane.resolve(request.model, request.model_version)
        model, card = served.model, served.model.card
        contract = {**INPUT_CONTRACT, **card.input_contract}  # cards may predate a field
        batching, limits = served.settings.batcher_limits, self._plane.limits  # config.pbtxt
        low, high = contract["range"]
        return digits_pb2.ModelInfo(
            name=card.name,
            version=card.version,
            model=served.name,
            model_version=served.version,
            weights_sha256=card.weights_sha256,
            file_sha256=model.file_sha256,
            test_accuracy=card.test_accuracy,
            test_loss=card.test_loss,
            labels=list(card.labels),
            dataset=card.dataset,
            created_at=card.created_at,
            input=digits_pb2.InputContract(
                name=model.input_name,
                shape=contract["shape"],
                dtype=contract["dtype"],
                layout=contract["layout"],
                min_value=low,
                max_value=high,
                background=contract["background"],
            ),
            execution_provider=model.provider,
            batching=digits_pb2.BatchingLimits(
                max_batch_size=batching.max_batch_size,
                max_delay_us=batching.max_delay_us,
                max_queue_size=batching.max_queue_size,
                max_images_per_request=limits.max_images_per_request,
                max_message_bytes=limits.max_message_bytes,
            ),
            training_config_json=json.dumps(card.training_config, sort_keys=True),
            library_versions=card.library_versions,
            detector_json=json.dumps(card.detector, sort_keys=True) if card.detector else "",
            worker=self._worker,
            workers=self._workers,
        )

    async def _list_models(
        self, call: Call, request: digits_pb2.ListModelsRequest
    ) -> digits_pb2.ListModelsResponse:
        rpc.parsed(request)
        return digits_pb2.ListModelsResponse(
            default_model=self._plane.default_model,
            models=[
                digits_pb2.ModelVersionStatus(
                    model=s.model, version=s.version, state=s.state, reason=s.reason
                )
                for s in self._plane.statuses()
            ],
        )


def _response(
    request: digits_pb2.ClassifyRequest,
    served: ServedVersion,
    result: Classified,
    worker: int = 0,
    workers: int = 1,
) -> digits_pb2.ClassifyResponse:
    labels = served.labels
    probabilities = result.probabilities
    rows = probabilities.tolist()
    # Plain dicts: protobuf builds nested messages from them ~1.7x faster than from
    # Prediction objects, which counts on 256-image replies.
    predictions = [
        {"digit": digit, "label": labels[digit], "confidence": row[digit], "probabilities": row}
        for digit, row in zip(probabilities.argmax(axis=1).tolist(), rows, strict=True)
    ]
    if result.digit_scores is not None:
        for prediction, score in zip(predictions, result.digit_scores.tolist(), strict=True):
            prediction["digit_score"] = score
    if result.is_digit is not None:
        for prediction, is_digit in zip(predictions, result.is_digit.tolist(), strict=True):
            prediction["is_digit"] = is_digit
    if request.top_k:
        order = np.argsort(-probabilities, axis=1)[:, : request.top_k].tolist()
        for prediction, row, ranked in zip(predictions, rows, order, strict=True):
            prediction["top"] = [
                {"digit": k, "label": labels[k], "probability": row[k]} for k in ranked
            ]
    execution = result.execution
    return digits_pb2.ClassifyResponse(
        request_id=request.request_id,
        predictions=predictions,
        model_version=execution.version,
        telemetry=digits_pb2.Telemetry(
            batch_size=execution.batch_size,
            batches=execution.batches,
            queue_us=execution.queue_us,
            compute_us=execution.compute_us,
            worker=worker,
            workers=workers,
        ),
    )
