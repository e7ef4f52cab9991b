"""Hostile input: property-based request messages and raw random bytes sent to every method.
The server must answer every one with a deliberate status, never INTERNAL or UNKNOWN, never
crash or hang, and keep serving good requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc, inference_pb2, inference_pb2_grpc

from onnx_models import one_hot_image, save, tiny_model

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
METHODS = ("Classify", "GetModelInfo")
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the module: (gRPC port, HTTP port)."""
    from processes import ServerProcess

    model = save(tiny_model(), tmp_path_factory.mktemp("fuzz") / "tiny.onnx")
    server = ServerProcess(
        "--model", str(model), "--max-images-per-request", "4", "--http-port", "0"
    )
    port = server.wait_serving()
    yield port, server.http_port()
    server.kill()
    assert server.proc.returncode is not None


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(f"127.0.0.1:{served[0]}") as chan:
        yield chan


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert "Traceback" not in (exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


def still_serving(chan) -> None:
    stub = digits_pb2_grpc.DigitClassifierStub(chan)
    reply = stub.Classify(digits_pb2.ClassifyRequest(pixels=one_hot_image(3)), timeout=5)
    assert reply.predictions[0].digit == 3


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
requests = st.builds(
    digits_pb2.ClassifyRequest,
    request_id=st.text(max_size=200),
    pixels=st.one_of(
        st.lists(floats, max_size=3200),
        st.integers(0, 5).map(lambda n: np.random.default_rng(n).random(784 * n).tolist()),
    ),
    pixels_f32le=st.binary(max_size=4 * 784 * 3),
    pixels_u8=st.one_of(st.binary(max_size=784 * 6), st.just(b"\x80" * 784)),
    top_k=st.integers(0, 2**32 - 1),
)


@FUZZ
@given(request=requests)
def test_any_request_message_gets_ok_or_invalid_argument(channel, request):
    stub = digits_pb2_grpc.DigitClassifierStub(channel)
    code = status_of(lambda: stub.Classify(request, timeout=10))
    assert code in ALLOWED


@FUZZ
@given(payload=st.binary(max_size=5000), method=st.sampled_from(METHODS))
def test_raw_bytes_to_unary_methods(channel, payload, method):
    call = channel.unary_unary(f"/digits.v1.DigitClassifier/{method}")  # bytes as they are
    assert status_of(lambda: call(payload, timeout=10)) in ALLOWED


@FUZZ
@given(payloads=st.lists(st.binary(max_size=4000), max_size=5))
def test_raw_bytes_on_the_stream(channel, payloads):
    call = channel.stream_stream("/digits.v1.DigitClassifier/ClassifyStream")
    replies = []
    code = status_of(lambda: replies.extend(call(iter(payloads), timeout=10)))
    assert code in ALLOWED
    for raw in replies:
        reply = digits_pb2.ClassifyStreamResponse.FromString(raw)
        if reply.WhichOneof("result") == "error":
            assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


OIP_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
               "ModelInfer", "RepositoryIndex")  # fmt: skip
OIP_ALLOWED = ALLOWED | {grpc.StatusCode.NOT_FOUND}


@FUZZ
@given(payload=st.binary(max_size=5000), method=st.sampled_from(OIP_METHODS))
def test_raw_bytes_to_every_oip_method(channel, payload, method):
    call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
    assert status_of(lambda: call(payload, timeout=10)) in OIP_ALLOWED


tensors = st.builds(
    inference_pb2.ModelInferRequest.InferInputTensor,
    name=st.sampled_from(["pixels", "", "x"]),
    datatype=st.sampled_from(["FP32", "INT8", ""]),
    shape=st.lists(st.integers(-(2**40), 2**40), max_size=3),
    contents=st.builds(
        inference_pb2.InferTensorContents, fp32_contents=st.lists(floats, max_size=1600)
    ),
)
infer_requests = st.builds(
    inference_pb2.ModelInferRequest,
    model_name=st.sampled_from(["tiny", "", "other"]),
    model_version=st.sampled_from(["", "1", "2", "abc"]),
    id=st.text(max_size=50),
    inputs=st.lists(tensors, max_size=2),
    raw_input_contents=st.lists(st.binary(max_size=4 * 784 * 2), max_size=2),
)


@FUZZ
@given(request=infer_requests)
def test_any_model_infer_message_gets_a_deliberate_status(channel, request):
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert status_of(lambda: stub.ModelInfer(request, timeout=10)) in OIP_ALLOWED


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=40,
)
bodies = st.one_of(
    st.binary(max_size=2000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({
        "name": st.sampled_from(["pixels", 1, None]),
        "datatype": st.sampled_from(["FP32", "BOOL", 3]),
        "shape": json_values,
        "data": json_values,
    }), max_size=2), "outputs": json_values}).map(lambda v: json.dumps(v).encode()),
)  # fmt: skip
HTTP_ROUTES = ("/v2/models/tiny/infer", "/v2/models/tiny/versions/1/infer",
               "/v2/repository/index", "/v1/classify")  # fmt: skip


@FUZZ
@given(body=bodies, route=st.sampled_from(HTTP_ROUTES))
def test_any_http_body_gets_a_json_4xx_or_200(served, body, route):
    request = urllib.request.Request(
        f"http://127.0.0.1:{served[1]}{route}", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            status, payload = reply.status, reply.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    assert status < 500, (status, payload[:300])
    json.loads(payload)  # always JSON


def test_the_server_survived_the_fuzzing(channel):
    still_serving(channel)
