"""Open Inference Protocol (KServe v2) over gRPC: a second thin front on the same batcher.

Callers that already speak to Triton, KServe or MLServer (tritonclient, kserve clients) reach
the same model, queue, limits, metrics and error mapping as `digits.v1.DigitClassifier`.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

import grpc
import numpy as np
from grpc_status import rpc_status

from digit_recognizer.protos import inference_pb2, inference_pb2_grpc
from digit_recognizer.server.errors import ServingError
from digit_recognizer.server.service import DigitClassifierService
from digit_recognizer.server.validation import invalid, to_images

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "onnxruntime_onnx"
FP32 = "FP32"
_LITTLE_ENDIAN_F32 = np.dtype("<f4")


class ModelNotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


def _server_version() -> str:
    try:
        return version("digit-recognizer")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0"


class InferenceService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """Delegates everything that matters (model, batching, draining) to the digits service."""

    def __init__(self, digits: DigitClassifierService) -> None:
        self._digits = digits

    async def ServerLive(
        self, request: inference_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ServerLiveResponse:
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: inference_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ServerReadyResponse:
        return inference_pb2.ServerReadyResponse(ready=not self._digits.draining)

    async def ModelReady(
        self, request: inference_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelReadyResponse:
        ready = self._is_served(request.name, request.version) and not self._digits.draining
        return inference_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: inference_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ServerMetadataResponse:
        return inference_pb2.ServerMetadataResponse(
            name="digit-recognizer", version=_server_version(), extensions=[]
        )

    async def ModelMetadata(
        self, request: inference_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelMetadataResponse:
        if not self._is_served(request.name, request.version):
            await self._abort(context, self._not_found(request.name, request.version))
        return self.metadata()

    async def ModelInfer(
        self, request: inference_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelInferResponse:
        started = time.perf_counter()
        try:
            response = await self.infer(request, context.time_remaining())
        except Exception as exc:
            status = self._digits.status_of(exc, "ModelInfer")
            self._digits.observe("ModelInfer", status.code, started)
            await context.abort_with_status(rpc_status.to_status(status.to_rpc_status()))
        self._digits.observe("ModelInfer", grpc.StatusCode.OK, started)
        return response

    async def infer(
        self, request: inference_pb2.ModelInferRequest, remaining: float | None
    ) -> inference_pb2.ModelInferResponse:
        """ModelInfer without gRPC: also what the HTTP /v2/.../infer route runs."""
        if not self._is_served(request.model_name, request.model_version):
            raise self._not_found(request.model_name, request.model_version)
        result = await self._digits.classify_pixels(self._pixels(request), remaining)
        model = self._digits.model
        probabilities = result.outputs
        return inference_pb2.ModelInferResponse(
            model_name=model.card.name,
            model_version=result.version,
            id=request.id,
            outputs=[
                inference_pb2.ModelInferResponse.InferOutputTensor(
                    name=model.output_name, datatype=FP32, shape=list(probabilities.shape)
                )
            ],
            raw_output_contents=[probabilities.astype(_LITTLE_ENDIAN_F32).tobytes()],
        )

    def metadata(self) -> inference_pb2.ModelMetadataResponse:
        model = self._digits.model
        tensor = inference_pb2.ModelMetadataResponse.TensorMetadata
        return inference_pb2.ModelMetadataResponse(
            name=model.card.name,
            versions=[model.card.version],
            platform=PLATFORM,
            inputs=[tensor(name=model.input_name, datatype=FP32, shape=[-1, 784])],
            outputs=[tensor(name=model.output_name, datatype=FP32, shape=[-1, model.num_classes])],
        )

    def check_served(self, name: str, model_version: str = "") -> None:
        if not self._is_served(name, model_version):
            raise self._not_found(name, model_version)

    def _is_served(self, name: str, model_version: str) -> bool:
        card = self._digits.model.card
        return name == card.name and model_version in ("", card.version)

    def _not_found(self, name: str, model_version: str) -> ModelNotFound:
        card = self._digits.model.card
        asked = f"{name!r}" + (f" version {model_version!r}" if model_version else "")
        return ModelNotFound(
            f"no model {asked} here; this server serves {card.name!r} version {card.version!r}"
        )

    def _pixels(self, request: inference_pb2.ModelInferRequest) -> np.ndarray:
        model = self._digits.model
        if len(request.inputs) != 1:
            raise invalid(
                "inputs",
                f"expected exactly one input tensor ({model.input_name!r} FP32 [N, 784]), "
                f"got {len(request.inputs)}",
            )
        tensor = request.inputs[0]
        if tensor.name != model.input_name or tensor.datatype != FP32:
            raise invalid(
                "inputs[0]",
                f"expected input {model.input_name!r} of datatype FP32, got {tensor.name!r} "
                f"{tensor.datatype or '(no datatype)'}",
            )
        for wanted in request.outputs:
            if wanted.name != model.output_name:
                raise invalid(
                    "outputs",
                    f"unknown output {wanted.name!r}; the model has {model.output_name!r}",
                )
        shape = list(tensor.shape)
        if len(shape) != 2 or shape[1] != 784 or shape[0] < 1:
            raise invalid("inputs[0].shape", f"expected shape [N, 784] with N >= 1, got {shape}")
        if request.raw_input_contents:
            if tensor.HasField("contents"):
                raise invalid("inputs[0].contents", "give raw_input_contents or contents, not both")
            raw = request.raw_input_contents[0]
            if len(raw) != shape[0] * 784 * 4:
                raise invalid(
                    "raw_input_contents[0]",
                    f"shape {shape} needs {shape[0] * 784 * 4} bytes of FP32, got {len(raw)}",
                )
            values = np.frombuffer(raw, dtype=_LITTLE_ENDIAN_F32).astype(np.float32, copy=False)
        else:
            values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
            if values.size != shape[0] * 784:
                raise invalid(
                    "inputs[0].contents.fp32_contents",
                    f"shape {shape} needs {shape[0] * 784} values, got {values.size}",
                )
        return to_images(
            "inputs[0]", values, self._digits.limits.max_images_per_request, check_range=True
        )

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, error: ServingError) -> None:
        await context.abort(error.code, str(error))
