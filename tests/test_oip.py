"""The Open Inference Protocol (KServe v2) front: same model, batcher and errors over gRPC."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from digit_recognizer.protos import inference_pb2 as v2
from digit_recognizer.protos import inference_pb2_grpc

from onnx_models import one_hot_image


def infer_request(images: np.ndarray, raw: bool, **fields) -> v2.ModelInferRequest:
    tensor = v2.ModelInferRequest.InferInputTensor(
        name="pixels", datatype="FP32", shape=list(images.shape)
    )
    request = v2.ModelInferRequest(inputs=[tensor], **({"model_name": "tiny", "id": "r1"} | fields))
    if raw:
        request.raw_input_contents.append(images.astype("<f4").tobytes())
    else:
        request.inputs[0].contents.fp32_contents.extend(images.ravel().tolist())
    return request


@pytest.fixture
async def v2_stub(start_server, tiny_model_path):
    server = await start_server(tiny_model_path, max_images_per_request=8)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel), server


@pytest.mark.parametrize("raw", [True, False])
async def test_model_infer_with_raw_and_typed_contents(v2_stub, raw):
    stub, _ = v2_stub
    images = np.stack([one_hot_image(d) for d in (3, 1, 4)])
    reply = await stub.ModelInfer(infer_request(images, raw))
    assert (reply.model_name, reply.model_version, reply.id) == ("tiny", "1", "r1")
    (output,) = reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [3, 10])
    probabilities = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(3, 10)
    assert probabilities.argmax(axis=1).tolist() == [3, 1, 4]


@pytest.mark.parametrize("raw", [True, False])
async def test_uint8_pixels_mean_what_float_ones_do(v2_stub, raw):
    """UINT8 0-255 (a quarter of the bytes) answers exactly what FP32 value/255 answers."""
    stub, _ = v2_stub
    rng = np.random.default_rng(0)
    images = np.stack([one_hot_image(d) for d in (3, 1, 4)]) * 255
    images = np.maximum(images, rng.integers(0, 40, images.shape)).astype(np.uint8)
    request = v2.ModelInferRequest(
        model_name="tiny",
        inputs=[
            v2.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[3, 784])
        ],
    )
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        request.inputs[0].contents.uint_contents.extend(images.ravel().tolist())
    as_uint8 = await stub.ModelInfer(request)
    as_float = await stub.ModelInfer(infer_request(images.astype(np.float32) / 255, raw=True))
    np.testing.assert_allclose(  # value * (1/255) on the server: within an ulp of value / 255
        np.frombuffer(as_uint8.raw_output_contents[0], "<f4"),
        np.frombuffer(as_float.raw_output_contents[0], "<f4"),
        atol=1e-6,
    )
    request.raw_input_contents[:] = []
    request.inputs[0].contents.uint_contents[:] = [256] * (3 * 784)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UINT8 value 256 at index 0 is not a whole 0..255" in info.value.details()


async def test_health_and_metadata(v2_stub):
    stub, _ = v2_stub
    assert (await stub.ServerLive(v2.ServerLiveRequest())).live
    assert (await stub.ServerReady(v2.ServerReadyRequest())).ready
    assert (await stub.ModelReady(v2.ModelReadyRequest(name="tiny"))).ready
    assert not (await stub.ModelReady(v2.ModelReadyRequest(name="other"))).ready
    assert (await stub.ServerMetadata(v2.ServerMetadataRequest())).name == "digit-recognizer"
    meta = await stub.ModelMetadata(v2.ModelMetadataRequest(name="tiny"))
    assert (meta.name, list(meta.versions), meta.platform) == ("tiny", ["1"], "onnxruntime_onnx")
    assert (meta.inputs[0].name, list(meta.inputs[0].shape)) == ("pixels", [-1, 784])
    assert (meta.outputs[0].name, list(meta.outputs[0].shape)) == ("probabilities", [-1, 10])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelMetadata(v2.ModelMetadataRequest(name="resnet"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _wrong_shape():
    request = infer_request(np.zeros((1, 784), np.float32), raw=True)
    request.inputs[0].shape[:] = [1, 28, 28]
    return request


def _short_raw():
    request = infer_request(np.zeros((2, 784), np.float32), raw=True)
    request.raw_input_contents[0] = b"\x00" * 100
    return request


def _with_input(**fields):
    def make():
        request = infer_request(np.zeros((1, 784), np.float32), raw=True)
        for key, value in fields.items():
            setattr(request.inputs[0], key, value)
        return request

    return make


def _unknown_output():
    request = infer_request(np.zeros((1, 784), np.float32), raw=True)
    request.outputs.add(name="logits")
    return request


def _raw_and_typed():
    request = infer_request(np.zeros((1, 784), np.float32), raw=True)
    request.inputs[0].contents.fp32_contents.extend([0.0] * 784)
    return request


def _short_typed():
    request = infer_request(np.zeros((1, 784), np.float32), raw=False)
    request.inputs[0].shape[:] = [2, 784]
    return request


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (lambda: v2.ModelInferRequest(model_name="tiny"), "INVALID_ARGUMENT", "exactly one input"),
        (_wrong_shape, "INVALID_ARGUMENT", "expected shape [N, 784]"),
        (_short_raw, "INVALID_ARGUMENT", "needs 6272 bytes of FP32, got 100"),
        (
            lambda: infer_request(np.full((1, 784), np.nan, np.float32), raw=False),
            "INVALID_ARGUMENT",
            "image 0, pixel 0 (row 0, column 0) is nan",
        ),
        (
            lambda: infer_request(np.zeros((9, 784), np.float32), raw=True),
            "INVALID_ARGUMENT",
            "9 images; at most 8",
        ),
        (
            lambda: infer_request(np.zeros((1, 784), np.float32), raw=True, model_name="x"),
            "NOT_FOUND",
            "no model 'x' here",
        ),
        (
            _with_input(datatype="INT8"),
            "INVALID_ARGUMENT",
            "FP32 (0-1) or UINT8 (0-255), got 'pixels' INT8",
        ),
        (_with_input(name="image"), "INVALID_ARGUMENT", "expected input 'pixels'"),
        (_unknown_output, "INVALID_ARGUMENT", "unknown output 'logits'"),
        (_raw_and_typed, "INVALID_ARGUMENT", "give raw_input_contents or contents, not both"),
        (_short_typed, "INVALID_ARGUMENT", "shape [2, 784] needs 1568 values, got 784"),
        (
            lambda: infer_request(np.zeros((1, 784), np.float32), raw=True, model_version="9"),
            "NOT_FOUND",
            "no model 'tiny' version '9' here",
        ),
    ],
)
async def test_errors_match_the_digits_api(v2_stub, make, code, message):
    stub, _ = v2_stub
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(make())
    assert info.value.code().name == code
    assert message in info.value.details()


async def test_malformed_messages_are_invalid_argument_on_every_service(v2_stub):
    """The same lenient parsing as digits.v1 (it used to be UNKNOWN naming a Python class)."""
    _, server = v2_stub
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in ("/inference.GRPCInferenceService/ModelInfer",
                       "/inference.GRPCInferenceService/ServerLive",
                       "/digits.v1.DigitClassifier/ListModels"):  # fmt: skip
            call = channel.unary_unary(method)  # bytes in, bytes out
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"\xff\xff\xff")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "is not a valid" in info.value.details() and "class" not in (
                info.value.details()
            )
