"""The Open Inference Protocol (KServe v2) over gRPC: a front beside digits.v1.

Callers that already speak to Triton, KServe or MLServer (tritonclient, kserve clients) reach
the same models, queues, limits, metrics and error mapping through the data plane.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable

import grpc
import numpy as np

from digit_recognizer.protos import inference_pb2, inference_pb2_grpc
from digit_recognizer.server import model_config, rpc
from digit_recognizer.server import openinference as oi
from digit_recognizer.server.dataplane import Call, CallFailed, DataPlane
from digit_recognizer.server.validation import invalid

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name
_Tensor = inference_pb2.ModelMetadataResponse.TensorMetadata


class InferenceService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, workers: int = 1) -> None:
        self._plane = plane
        self._workers = workers  # --workers: the instance count ModelConfig reports

    def add_to(self, server: grpc.aio.Server) -> None:
        rpc.add_service(self, SERVICE, server)

    async def ServerLive(
        self, request: inference_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ServerLiveResponse:
        return await rpc.answer(self._plane, "ServerLive", context, self._live, request)

    async def ServerReady(
        self, request: inference_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ServerReadyResponse:
        return await rpc.answer(self._plane, "ServerReady", context, self._ready, request)

    async def ModelReady(
        self, request: inference_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelReadyResponse:
        return await rpc.answer(self._plane, "ModelReady", context, self._model_ready, request)

    async def ServerMetadata(
        self, request: inference_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ServerMetadataResponse:
        return await rpc.answer(self._plane, "ServerMetadata", context, self._server_meta, request)

    async def ModelMetadata(
        self, request: inference_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelMetadataResponse:
        return await rpc.answer(self._plane, "ModelMetadata", context, self._metadata, request)

    async def ModelInfer(
        self, request: inference_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelInferResponse:
        return await rpc.answer(
            self._plane, "ModelInfer", context, self._infer, request, context.time_remaining()
        )

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[inference_pb2.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.ModelStreamInferResponse]:
        # As ClassifyStream: computed concurrently, replies in completion order, the same
        # read-ahead window (rpc.windowed). An error ends one request, not the stream: it goes
        # back in-stream as error_message (Triton's way), with the request's id.
        def reply(
            request: inference_pb2.ModelInferRequest,
        ) -> Awaitable[inference_pb2.ModelStreamInferResponse]:
            return self._stream_reply(request, context)

        async with contextlib.aclosing(rpc.windowed(request_iterator, reply)) as replies:
            async for response in replies:
                yield response

    async def ModelConfig(
        self, request: inference_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelConfigResponse:
        return await rpc.answer(self._plane, "ModelConfig", context, self._config, request)

    async def ModelStatistics(
        self, request: inference_pb2.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelStatisticsResponse:
        return await rpc.answer(self._plane, "ModelStatistics", context, self._stats, request)

    async def RepositoryIndex(
        self, request: inference_pb2.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.RepositoryIndexResponse:
        return await rpc.answer(self._plane, "RepositoryIndex", context, self._index, request)

    async def _live(self, call: Call, request: object) -> inference_pb2.ServerLiveResponse:
        rpc.parsed(request)
        return inference_pb2.ServerLiveResponse(live=True)

    async def _ready(self, call: Call, request: object) -> inference_pb2.ServerReadyResponse:
        rpc.parsed(request)
        return inference_pb2.ServerReadyResponse(ready=not self._plane.draining)

    async def _model_ready(
        self, call: Call, request: inference_pb2.ModelReadyRequest
    ) -> inference_pb2.ModelReadyResponse:
        request = rpc.parsed(request)
        served = self._plane.is_served(request.name, request.version)
        return inference_pb2.ModelReadyResponse(ready=served and not self._plane.draining)

    async def _server_meta(
        self, call: Call, request: object
    ) -> inference_pb2.ServerMetadataResponse:
        rpc.parsed(request)
        return inference_pb2.ServerMetadataResponse(
            name=oi.SERVER_NAME, version=oi.server_version(), extensions=oi.EXTENSIONS
        )

    async def _metadata(
        self, call: Call, request: inference_pb2.ModelMetadataRequest
    ) -> inference_pb2.ModelMetadataResponse:
        request = rpc.parsed(request)
        call.served = self._plane.resolve(request.name, request.version)
        meta = oi.metadata(self._plane, call.served)
        return inference_pb2.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[_Tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[
                _Tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs
            ],
        )

    async def _config(
        self, call: Call, request: inference_pb2.ModelConfigRequest
    ) -> inference_pb2.ModelConfigResponse:
        request = rpc.parsed(request)
        call.served = self._plane.resolve(request.name, request.version)
        config = model_config.describe(call.served, workers=self._workers)
        return inference_pb2.ModelConfigResponse(config=config)

    async def _stats(
        self, call: Call, request: inference_pb2.ModelStatisticsRequest
    ) -> inference_pb2.ModelStatisticsResponse:
        request = rpc.parsed(request)
        return oi.statistics(self._plane, request.name, request.version)

    async def _stream_reply(
        self, request: inference_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelStreamInferResponse:
        try:
            response = await self._plane.observed(
                "ModelStreamInfer",
                self._infer,
                request,
                context.time_remaining(),
                carrier=context.invocation_metadata,
            )
        except CallFailed as failed:
            asked = inference_pb2.ModelInferResponse(
                model_name=getattr(request, "model_name", ""),
                model_version=getattr(request, "model_version", ""),
                id=getattr(request, "id", ""),
            )
            return inference_pb2.ModelStreamInferResponse(
                error_message=failed.status.message, infer_response=asked
            )
        return inference_pb2.ModelStreamInferResponse(infer_response=response)

    async def _index(
        self, call: Call, request: inference_pb2.RepositoryIndexRequest
    ) -> inference_pb2.RepositoryIndexResponse:
        request = rpc.parsed(request)
        index = inference_pb2.RepositoryIndexResponse.ModelIndex
        return inference_pb2.RepositoryIndexResponse(
            models=[
                index(name=s.model, version=s.version, state=s.state, reason=s.reason)
                for s in self._plane.statuses(ready_only=request.ready)
            ]
        )

    async def _infer(
        self, call: Call, request: inference_pb2.ModelInferRequest, remaining: float | None
    ) -> inference_pb2.ModelInferResponse:
        request = rpc.parsed(request)
        served = self._plane.choose(call, request.model_name, request.model_version)
        headers = [oi.TensorHeader(t.name, t.datatype, tuple(t.shape)) for t in request.inputs]
        images = oi.check_request(served, headers, [wanted.name for wanted in request.outputs])
        max_images = self._plane.limits.max_images_per_request
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise invalid(
                    "raw_input_contents",
                    f"{len(request.raw_input_contents)} raw_input_contents for "
                    f"{len(request.inputs)} input; give exactly one per input",
                )
            if request.inputs[0].HasField("contents"):
                raise invalid("inputs[0].contents", "give raw_input_contents or contents, not both")
            field = "raw_input_contents[0]"
            values = oi.raw_values(field, headers[0], images, request.raw_input_contents[0])
        elif headers[0].datatype == oi.UINT8:  # the protocol carries UINT8 in uint_contents
            values = np.asarray(request.inputs[0].contents.uint_contents, dtype=np.int64)
            field = "inputs[0].contents.uint_contents"
        else:
            values = np.asarray(request.inputs[0].contents.fp32_contents, dtype=np.float32)
            field = "inputs[0].contents.fp32_contents"
        pixels = oi.to_pixels(field, images, values, max_images, headers[0].datatype)
        result = await self._plane.classify(served, pixels, remaining)
        chosen = oi.outputs(served, result, [wanted.name for wanted in request.outputs])
        return inference_pb2.ModelInferResponse(
            model_name=served.name,
            model_version=result.version,
            id=request.id,
            outputs=[
                inference_pb2.ModelInferResponse.InferOutputTensor(
                    name=header.name, datatype=header.datatype, shape=list(header.shape)
                )
                for header, _ in chosen
            ],
            raw_output_contents=[oi.raw_bytes(header, values) for header, values in chosen],
        )

    # Explicit model control (Triton's model repository extension); --model-control-mode
    # explicit, behind the auth token like every call.

    async def RepositoryModelLoad(
        self, request: inference_pb2.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.RepositoryModelLoadResponse:
        async def load(
            call: Call, request: inference_pb2.RepositoryModelLoadRequest
        ) -> inference_pb2.RepositoryModelLoadResponse:
            request = rpc.parsed(request)
            await self._plane.load_model(request.model_name, list(request.parameters))
            return inference_pb2.RepositoryModelLoadResponse()

        return await rpc.answer(self._plane, "RepositoryModelLoad", context, load, request)

    async def RepositoryModelUnload(
        self,
        request: inference_pb2.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.RepositoryModelUnloadResponse:
        async def unload(
            call: Call, request: inference_pb2.RepositoryModelUnloadRequest
        ) -> inference_pb2.RepositoryModelUnloadResponse:
            request = rpc.parsed(request)
            await self._plane.unload_model(request.model_name, list(request.parameters))
            return inference_pb2.RepositoryModelUnloadResponse()

        return await rpc.answer(self._plane, "RepositoryModelUnload", context, unload, request)
