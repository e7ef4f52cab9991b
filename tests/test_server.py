"""The gRPC server end to end: real servers on 127.0.0.1:0, real channels, no mocks."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
from digit_recognizer.server.errors import ModelError
from digit_recognizer.server.inference import InferenceOptions, Model, load_model
from digit_recognizer.trainer.data import load_dataset, to_model_inputs

from onnx_models import one_hot_image, save, tiny_model
from waiting import until

SERVICE = "digits.v1.DigitClassifier"


def channel(server) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


def stub(chan) -> digits_pb2_grpc.DigitClassifierStub:
    return digits_pb2_grpc.DigitClassifierStub(chan)


def images(*digits: int) -> np.ndarray:
    return np.stack([one_hot_image(d) for d in digits])


async def test_classify_every_encoding_in_input_order(start_server, tiny_model_path):
    server = await start_server(tiny_model_path)
    batch = images(3, 1, 4, 1, 5, 9, 2, 6)
    requests = [
        digits_pb2.ClassifyRequest(request_id="packed", pixels=batch.ravel().tolist()),
        digits_pb2.ClassifyRequest(request_id="raw", pixels_f32le=batch.astype("<f4").tobytes()),
        digits_pb2.ClassifyRequest(
            request_id="u8", pixels_u8=(batch * 255).astype(np.uint8).tobytes()
        ),
    ]
    async with channel(server) as chan:
        for request in requests:
            reply = await stub(chan).Classify(request)
            assert reply.request_id == request.request_id
            assert [p.digit for p in reply.predictions] == [3, 1, 4, 1, 5, 9, 2, 6]
            assert [p.label for p in reply.predictions] == list("31415926")
            first = reply.predictions[0]
            assert len(first.probabilities) == 10
            assert sum(first.probabilities) == pytest.approx(1.0, abs=1e-5)
            assert first.confidence == max(first.probabilities)
            assert reply.model_version == "1"
            assert reply.telemetry.batch_size >= 8 and reply.telemetry.batches == 1


async def test_top_k_lists_the_most_likely_classes(start_server, tiny_model_path):
    server = await start_server(tiny_model_path)
    pixels = np.zeros(784, np.float32)
    pixels[[7, 17, 27, 2]] = 1.0  # class 7 three times, class 2 once
    async with channel(server) as chan:
        reply = await stub(chan).Classify(
            digits_pb2.ClassifyRequest(pixels=pixels.tolist(), top_k=3)
        )
    top = reply.predictions[0].top
    assert [c.digit for c in top][:2] == [7, 2]
    assert top[0].probability >= top[1].probability >= top[2].probability


async def test_large_requests_are_split_across_model_runs(start_server, tiny_model_path):
    server = await start_server(tiny_model_path, max_batch_size=32)
    digits = [i % 10 for i in range(100)]
    async with channel(server) as chan:
        reply = await stub(chan).Classify(
            digits_pb2.ClassifyRequest(pixels_f32le=images(*digits).astype("<f4").tobytes())
        )
    assert [p.digit for p in reply.predictions] == digits
    assert (reply.telemetry.batches, reply.telemetry.batch_size) == (4, 32)


BAD_REQUESTS = [
    (digits_pb2.ClassifyRequest(), "the request holds no images"),
    (digits_pb2.ClassifyRequest(pixels=[0.0] * 783), "783 values, not a multiple of 784"),
    (digits_pb2.ClassifyRequest(pixels=[0.0] * 785), "1 whole image(s) and 1 value(s) left over"),
    (
        digits_pb2.ClassifyRequest(pixels=[0.0] * (784 * 2 + 1)),
        "2 whole image(s) and 1 value(s) left over",
    ),
    (
        digits_pb2.ClassifyRequest(pixels=[0.0] * 784 + [0.0] * 5 + [float("nan")] + [0.0] * 778),
        "image 1, pixel 5 (row 0, column 5) is nan",
    ),
    (
        digits_pb2.ClassifyRequest(pixels=[float("inf")] * 784),
        "image 0, pixel 0 (row 0, column 0) is inf",
    ),
    (
        digits_pb2.ClassifyRequest(pixels=[0.0] * 783 + [255.0]),
        "pixel 783 (row 27, column 27) is 255.0",
    ),
    (digits_pb2.ClassifyRequest(pixels=[-0.5] * 784), "is -0.5; pixels must be finite"),
    (digits_pb2.ClassifyRequest(pixels_f32le=b"\x00" * 3135), "3135 bytes, not a multiple of 4"),
    (digits_pb2.ClassifyRequest(pixels_u8=b"\x00" * 100), "100 values, not a multiple of 784"),
    (
        digits_pb2.ClassifyRequest(pixels=[0.0] * 784, pixels_u8=b"\x00" * 784),
        "set only one image encoding; got pixels and pixels_u8",
    ),
    (digits_pb2.ClassifyRequest(pixels=[0.0] * 784, top_k=11), "top_k is 11; this model has 10"),
    (digits_pb2.ClassifyRequest(pixels_u8=b"\x00" * 784 * 9), "9 images; at most 8 are allowed"),
    (digits_pb2.ClassifyRequest(pixels=[0.0] * 784, request_id="x" * 129), "at most 128"),
]


@pytest.mark.parametrize(("request_", "message"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument_with_an_actionable_message(
    start_server, tiny_model_path, request_, message
):
    server = await start_server(tiny_model_path, max_images_per_request=8)
    async with channel(server) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(chan).Classify(request_)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
        # the details carry google.rpc.BadRequest field violations
        status = rpc_status.from_call(info.value)
        assert status is not None and status.details
        # and the server goes on serving
        reply = await stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(4).ravel()))
        assert reply.predictions[0].digit == 4


async def test_oversized_message_is_refused_by_the_transport(start_server, tiny_model_path):
    server = await start_server(tiny_model_path, max_images_per_request=2)
    async with channel(server) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(chan).Classify(digits_pb2.ClassifyRequest(pixels_u8=b"\x00" * 2_000_000))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details()


@dataclasses.dataclass(frozen=True)
class GatedModel(Model):
    """The tiny model behind a gate the test opens, to hold requests in the queue."""

    gate: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: threading.Event = dataclasses.field(default_factory=threading.Event)
    calls: list = dataclasses.field(default_factory=list)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        self.calls.append(pixels.copy())
        self.started.set()
        assert self.gate.wait(timeout=20)
        return super().predict(pixels)


def gated(path) -> GatedModel:
    model = load_model(path, InferenceOptions(provider="cpu"))
    return GatedModel(**{f.name: getattr(model, f.name) for f in dataclasses.fields(Model)})


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


async def test_full_queue_gives_resource_exhausted_at_once(start_server, tiny_model_path):
    model = gated(tiny_model_path)
    server = await start_server(
        tiny_model_path, model=model, max_queue_size=4, max_images_per_request=4
    )
    async with channel(server) as chan:
        running = asyncio.ensure_future(
            stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(1).ravel()))
        )
        await wait_for(model.started)
        queued = asyncio.ensure_future(
            stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(2, 3, 4).ravel()))
        )
        await until(lambda: server.plane.queued_images >= 3, "3 images queued")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(chan).Classify(
                digits_pb2.ClassifyRequest(pixels=images(5, 6).ravel()), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full (3 of 4 images waiting, this request adds 2)" in info.value.details()
        model.gate.set()
        assert [p.digit for p in (await queued).predictions] == [2, 3, 4]
        assert (await running).predictions[0].digit == 1


@dataclasses.dataclass(frozen=True)
class FailingOnceModel(Model):
    failures: list = dataclasses.field(default_factory=lambda: [RuntimeError("CUDA OOM\n  at x")])

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        if self.failures:
            raise self.failures.pop()
        return super().predict(pixels)


async def test_a_failed_model_run_is_internal_without_details_and_the_server_goes_on(
    start_server, tiny_model_path
):
    loaded = load_model(tiny_model_path, InferenceOptions(provider="cpu"))
    model = FailingOnceModel(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(Model)})
    server = await start_server(tiny_model_path, model=model)
    async with channel(server) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(1).ravel()))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "Traceback" not in info.value.details() and "\n" not in info.value.details()
        reply = await stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(2).ravel()))
        assert reply.predictions[0].digit == 2


async def test_expired_and_cancelled_requests_are_never_computed(start_server, tiny_model_path):
    from prometheus_client import REGISTRY

    def skipped(reason: str) -> float:
        labels = {"reason": reason, "model": "tiny", "version": "1"}
        return REGISTRY.get_sample_value("digits_skipped_total", labels) or 0.0

    before = {reason: skipped(reason) for reason in ("deadline", "cancelled")}
    model = gated(tiny_model_path)
    server = await start_server(tiny_model_path, model=model)
    async with channel(server) as chan:
        blocker = asyncio.ensure_future(
            stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(1).ravel()))
        )
        await wait_for(model.started)
        expiring = stub(chan).Classify(
            digits_pb2.ClassifyRequest(pixels=images(7).ravel()), timeout=0.2
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await expiring
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # gRPC cancels the expired handler on the server too: it stops counting at once.
        await until(
            lambda: server.plane.active_requests <= 1 and not server.plane.queued_images,
            "the expired call gone",
        )
        cancelled = stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(8).ravel()))
        await until(lambda: server.plane.queued_images >= 1, "the call to cancel queued")
        cancelled.cancel()
        # The cancellation travels to the server asynchronously: release the model only once
        # both abandoned handlers are gone (only the blocker is still active) and their
        # images no longer count against the queue.
        await until(
            lambda: server.plane.active_requests <= 1 and not server.plane.queued_images,
            "the cancelled call gone",
        )
        model.gate.set()
        await blocker
        after = await stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(3).ravel()))
        assert after.predictions[0].digit == 3
    computed = np.concatenate(model.calls).argmax(axis=1).tolist()
    assert 7 not in computed and 8 not in computed and computed == [1, 3]
    # The deadline case is counted when the batcher drops it or gRPC cancels it first.
    assert skipped("deadline") + skipped("cancelled") >= sum(before.values()) + 2


async def test_stream_answers_each_message_and_survives_bad_ones(start_server, tiny_model_path):
    server = await start_server(tiny_model_path)

    async def messages():
        for i in range(20):
            if i % 5 == 4:
                yield digits_pb2.ClassifyRequest(request_id=f"bad-{i}", pixels=[0.0] * 10)
            else:
                yield digits_pb2.ClassifyRequest(
                    request_id=f"ok-{i}", pixels=images(i % 10).ravel().tolist()
                )

    async with channel(server) as chan:
        replies = [r async for r in stub(chan).ClassifyStream(messages())]
    assert len(replies) == 20
    by_id = {r.request_id: r for r in replies}
    for i in range(20):
        reply = by_id[f"{'bad' if i % 5 == 4 else 'ok'}-{i}"]
        if i % 5 == 4:
            assert reply.WhichOneof("result") == "error"
            assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "not a multiple of 784" in reply.error.message
        else:
            assert reply.response.predictions[0].digit == i % 10


async def test_model_info_describes_the_model_and_the_limits(start_server, tiny_model_path):
    server = await start_server(tiny_model_path, max_batch_size=64, max_delay_us=250)
    async with channel(server) as chan:
        info = await stub(chan).GetModelInfo(digits_pb2.GetModelInfoRequest())
    assert (info.name, info.version, info.dataset) == ("tiny", "1", "synthetic")
    assert list(info.labels) == list("0123456789")
    assert list(info.input.shape) == [-1, 784] and info.input.dtype == "float32"
    assert (info.input.min_value, info.input.max_value) == (0.0, 1.0)
    assert info.execution_provider == "CPUExecutionProvider"
    assert (info.batching.max_batch_size, info.batching.max_delay_us) == (64, 250)
    assert info.batching.max_message_bytes > 1024 * 784 * 4
    assert len(info.file_sha256) == 64


async def test_health_check_and_watch_follow_the_lifecycle(start_server, tiny_model_path):
    server = await start_server(tiny_model_path)
    async with channel(server) as chan:
        health = health_pb2_grpc.HealthStub(chan)
        for name in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(server.stop(grace_s=1))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


async def test_reflection_lists_the_services(start_server, tiny_model_path):
    server = await start_server(tiny_model_path)
    async with channel(server) as chan:
        reflection = reflection_pb2_grpc.ServerReflectionStub(chan)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        replies = [r async for r in reflection.ServerReflectionInfo(ask())]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_metrics_endpoint_scrapes(start_server, tiny_model_path):
    from prometheus_client import REGISTRY

    from digit_recognizer.server.metrics import serve_metrics

    tiny = {"model": "tiny", "version": "1"}
    counted = {
        "ok": ("digits_requests_total", {"method": "Classify", "code": "OK", **tiny}),
        "invalid": (
            "digits_requests_total",
            {"method": "Classify", "code": "INVALID_ARGUMENT", **tiny},
        ),
        "images": ("digits_images_total", tiny),
        "runs": ("digits_batch_size_images_count", tiny),
    }

    def counts() -> dict[str, float]:
        return {k: REGISTRY.get_sample_value(*v) or 0.0 for k, v in counted.items()}

    before = counts()
    server = await start_server(tiny_model_path)
    async with channel(server) as chan:
        await stub(chan).Classify(digits_pb2.ClassifyRequest(pixels=images(1, 2).ravel()))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub(chan).Classify(digits_pb2.ClassifyRequest())
    after = counts()
    assert {k: after[k] - before[k] for k in counted} == {
        "ok": 1, "invalid": 1, "images": 2, "runs": 1,
    }  # fmt: skip
    http = serve_metrics(0, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{http.server_port}/metrics"
        body = (
            await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        ).decode()
    finally:
        http.shutdown()
    for needle in (
        'digits_requests_total{code="OK",method="Classify",model="tiny",version="1"}',
        # Refused after its model was chosen: labelled with it.
        'digits_requests_total{code="INVALID_ARGUMENT",method="Classify",model="tiny",version="1"}',
        "digits_images_total",
        "digits_batch_size_images_bucket",
        "digits_queue_wait_seconds_bucket",
        "digits_request_latency_seconds_bucket",
        'digits_model_info{name="tiny"',
        "digits_queue_depth_images",
    ):
        assert needle in body


def test_unservable_models_are_refused_with_one_line(tmp_path):
    options = InferenceOptions(provider="cpu")
    cases = {
        "missing.onnx": (None, "cannot read model"),
        "empty.onnx": (b"", "model file is empty"),
        "random.onnx": (np.random.default_rng(0).bytes(5000), "not a loadable ONNX model"),
        "nocard.onnx": (tiny_model(card=None).SerializeToString(), "model card incomplete"),
        "wide_input.onnx": (
            tiny_model(input_width=100).SerializeToString(),
            "expected one float input [batch, 784], found pixels tensor(float) ['batch', 100]",
        ),
        "wide_output.onnx": (
            tiny_model(output_width=12).SerializeToString(),
            "expected one output [batch, 10] (one column per label)",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ModelError) as info:
            load_model(path, options)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_cuda_requested_without_cuda_is_refused(tiny_model_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="provider 'cuda' requested but onnxruntime offers only"):
        load_model(tiny_model_path, InferenceOptions(provider="cuda"))
    auto = load_model(tiny_model_path, InferenceOptions(provider="auto"))
    assert auto.provider == "CPUExecutionProvider"


async def test_trained_model_reads_real_mnist_digits(start_server, trained_model, mnist_dir):
    server = await start_server(trained_model)
    dataset = load_dataset(mnist_dir)
    pixels = to_model_inputs(dataset.x_test[:500])
    async with channel(server) as chan:
        reply = await stub(chan).Classify(
            digits_pb2.ClassifyRequest(pixels_f32le=pixels.astype("<f4").tobytes())
        )
        info = await stub(chan).GetModelInfo(digits_pb2.GetModelInfoRequest())
    predicted = np.array([p.digit for p in reply.predictions])
    accuracy = float(np.mean(predicted == dataset.y_test[:500]))
    assert accuracy > 0.85 and abs(accuracy - info.test_accuracy) < 0.05
    assert reply.model_version == info.version == "7"


def test_model_file_with_corrupt_card_json(tmp_path):
    model = tiny_model()
    for prop in model.metadata_props:
        if prop.key == "labels":
            prop.value = "[not json"
    path = save(model, tmp_path / "badcard.onnx")
    with pytest.raises(ModelError, match="'labels' is malformed"):
        load_model(path, InferenceOptions(provider="cpu"))


async def test_a_stream_reads_at_most_its_window_ahead_of_its_replies(
    start_server, tiny_model_path
):
    """A caller whose replies are not being written cannot make the server read on."""
    from digit_recognizer.server.service import STREAM_WINDOW

    model = gated(tiny_model_path)
    server = await start_server(tiny_model_path, model=model)
    async with channel(server) as chan:
        requests = [
            digits_pb2.ClassifyRequest(request_id=str(i), pixels=images(i % 10).ravel())
            for i in range(3 * STREAM_WINDOW)
        ]
        call = stub(chan).ClassifyStream(iter(requests))
        await wait_for(model.started)
        for _ in range(500):  # bounded: 5 s
            if server.plane.active_requests >= STREAM_WINDOW:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # time in which an unbounded reader would read on
        assert server.plane.active_requests == STREAM_WINDOW
        model.gate.set()
        replies = [reply async for reply in call]
    assert sorted(int(r.request_id) for r in replies) == list(range(3 * STREAM_WINDOW))


def test_cuda_runs_in_full_float32_unless_tf32_is_allowed():
    from digit_recognizer.server.inference import CPU, CUDA, provider_options

    assert provider_options(CUDA, InferenceOptions()) == {"use_tf32": "0"}
    assert provider_options(CUDA, InferenceOptions(allow_tf32=True)) == {"use_tf32": "1"}
    assert provider_options(CPU, InferenceOptions(allow_tf32=True)) == {}


def test_small_runs_take_a_one_thread_session_with_the_same_answers(tmp_path):
    from digit_recognizer.server.inference import SMALL_RUN_IMAGES

    path = save(tiny_model(), tmp_path / "tiny.onnx")
    threaded = load_model(path, InferenceOptions(provider="cpu", intra_op_threads=2))
    single = load_model(path, InferenceOptions(provider="cpu", intra_op_threads=1))
    assert threaded.small_session is not None and single.small_session is None
    small_runs = []
    real_run = threaded.small_session.run

    class Counting:  # sessions are C++ objects: wrap, do not patch
        def run(self, *args):
            small_runs.append(args)
            return real_run(*args)

    object.__setattr__(threaded, "small_session", Counting())
    rng = np.random.default_rng(0)
    for images in (1, SMALL_RUN_IMAGES, SMALL_RUN_IMAGES + 1, 64):
        pixels = rng.random((images, 784), dtype=np.float32)
        np.testing.assert_array_equal(threaded.predict(pixels), single.predict(pixels))
    assert len(small_runs) == 2  # 1 and SMALL_RUN_IMAGES images; the larger runs use threads
