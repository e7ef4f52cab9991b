"""Hostile input: property-based request messages and raw random bytes sent to every method.
The server must answer every one with a deliberate status, never INTERNAL or UNKNOWN, never
crash or hang, and keep serving good requests."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc

from onnx_models import one_hot_image, save, tiny_model

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
METHODS = ("Classify", "GetModelInfo")
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    from processes import ServerProcess

    model = save(tiny_model(), tmp_path_factory.mktemp("fuzz") / "tiny.onnx")
    server = ServerProcess("--model", str(model), "--max-images-per-request", "4")
    port = server.wait_serving()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    server.kill()
    assert server.proc.returncode is not None


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


def test_the_server_survived_the_fuzzing(channel):
    still_serving(channel)
