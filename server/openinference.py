"""The Open Inference Protocol (KServe v2) without a transport: what its gRPC front (oip.py)
and its REST routes (http.py) share. Tensors arrive as (name, datatype, shape) headers plus
values; these checks turn them into validated (N, 784) images or an InvalidInput that names
the field, with the same messages on both transports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from digit_recognizer.protos import inference_pb2
from digit_recognizer.protos.contract import PIXELS_PER_IMAGE
from digit_recognizer.server.dataplane import Classified, DataPlane, ServedVersion
from digit_recognizer.server.statistics import Duration
from digit_recognizer.server.validation import invalid, to_images

PLATFORM = "onnxruntime_onnx"
FP32 = "FP32"
UINT8 = "UINT8"  # 0-255 pixels, a quarter of the bytes: what 8-bit pictures and IDX files hold
BYTES_PER_VALUE = {FP32: 4, UINT8: 1}
BOOL = "BOOL"
# Tensors as raw bytes (gRPC raw_*_contents, REST binary data): little-endian, one byte per BOOL.
RAW_DTYPES: dict[str, np.dtype[Any]] = {
    FP32: np.dtype("<f4"),
    UINT8: np.dtype(np.uint8),
    BOOL: np.dtype(np.bool_),
}
IS_DIGIT = "is_digit"  # the detector's verdict; its score is the model's SCORE_NAME output
SERVER_NAME = "digit-recognizer"
# Triton's names for the extensions served: REST binary tensors, ModelStatistics, ModelConfig,
# and the model repository (index, load, unload).
EXTENSIONS = ("binary_tensor_data", "statistics", "model_configuration", "model_repository")


@dataclass(frozen=True)
class TensorHeader:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Metadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorHeader, ...]
    outputs: tuple[TensorHeader, ...]


def server_version() -> str:
    try:
        return version("digit-recognizer")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0"


def metadata(plane: DataPlane, served: ServedVersion) -> Metadata:
    model = served.model
    return Metadata(
        name=served.name,
        versions=tuple(s.version for s in plane.served() if s.name == served.name),
        platform=PLATFORM,
        inputs=(TensorHeader(model.input_name, FP32, (-1, PIXELS_PER_IMAGE)),),
        outputs=tuple(header for header, _ in _outputs(served, None)),
    )


def _outputs(
    served: ServedVersion, result: Classified | None
) -> list[tuple[TensorHeader, np.ndarray | None]]:
    """Every output this version gives, with its values when `result` is given: the class
    probabilities, and with a not-a-digit detector the digit score and the verdict."""
    model = served.model
    n = -1 if result is None else len(result.probabilities)
    outputs: list[tuple[TensorHeader, np.ndarray | None]] = [
        (
            TensorHeader(model.output_name, FP32, (n, len(served.labels))),
            None if result is None else result.probabilities,
        )
    ]
    if model.score_name is not None:
        scores = None if result is None else result.digit_scores
        outputs.append((TensorHeader(model.score_name, FP32, (n,)), scores))
        if model.card.digit_threshold is not None:
            verdicts = None if result is None else result.is_digit
            outputs.append((TensorHeader(IS_DIGIT, BOOL, (n,)), verdicts))
    return outputs


def outputs(
    served: ServedVersion, result: Classified, wanted: Sequence[str]
) -> list[tuple[TensorHeader, np.ndarray]]:
    """The outputs asked for (all of them when none is named), in the model's order."""
    return [
        (header, values)
        for header, values in _outputs(served, result)
        if values is not None and (not wanted or header.name in wanted)
    ]


def check_request(
    served: ServedVersion, inputs: Sequence[TensorHeader], outputs: Sequence[str]
) -> int:
    """The number of images the one input tensor holds, or InvalidInput."""
    model = served.model
    if len(inputs) != 1:
        raise invalid(
            "inputs",
            f"expected exactly one input tensor ({model.input_name!r} FP32 "
            f"[N, {PIXELS_PER_IMAGE}]), got {len(inputs)}",
        )
    tensor = inputs[0]
    if tensor.name != model.input_name or tensor.datatype not in BYTES_PER_VALUE:
        raise invalid(
            "inputs[0]",
            f"expected input {model.input_name!r} of datatype FP32 (0-1) or UINT8 (0-255), got "
            f"{tensor.name!r} {tensor.datatype or '(no datatype)'}",
        )
    known = [header.name for header, _ in _outputs(served, None)]
    for wanted in outputs:
        if wanted not in known:
            raise invalid(
                "outputs",
                f"unknown output {wanted!r}; the model has {', '.join(map(repr, known))}",
            )
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != PIXELS_PER_IMAGE or shape[0] < 1:
        raise invalid(
            "inputs[0].shape",
            f"expected shape [N, {PIXELS_PER_IMAGE}] with N >= 1, got {shape}",
        )
    return shape[0]


def to_pixels(
    field: str, images: int, values: np.ndarray, max_images: int, datatype: str = FP32
) -> np.ndarray:
    """Flat values of `datatype` for `images` images -> checked (N, 784) float32 pixels.
    UINT8 values arrive as uint8 (raw bytes) or as numbers that must be whole and in 0..255."""
    if values.size != images * PIXELS_PER_IMAGE:
        raise invalid(
            field,
            f"shape [{images}, {PIXELS_PER_IMAGE}] needs {images * PIXELS_PER_IMAGE} values, "
            f"got {values.size}",
        )
    if datatype != UINT8:
        pixels = values.astype(np.float32, copy=False)  # native order, as the model takes it
        return to_images("inputs[0]", pixels, max_images, check_range=True)
    if values.dtype != np.uint8:
        bad = np.flatnonzero(~((values >= 0) & (values <= 255) & (values == np.round(values))))
        if bad.size:
            raise invalid(
                field, f"UINT8 value {values[bad[0]]} at index {bad[0]} is not a whole 0..255"
            )
    scaled = values.astype(np.float32) * np.float32(1 / 255)
    return to_images("inputs[0]", scaled, max_images, check_range=False)


def raw_values(field: str, tensor: TensorHeader, images: int, raw: bytes) -> np.ndarray:
    """A checked input tensor's raw little-endian bytes -> its flat values (for to_pixels)."""
    needed = images * PIXELS_PER_IMAGE * BYTES_PER_VALUE[tensor.datatype]
    if len(raw) != needed:
        raise invalid(
            field,
            f"shape {list(tensor.shape)} needs {needed} bytes of {tensor.datatype}, got {len(raw)}",
        )
    return np.frombuffer(raw, dtype=RAW_DTYPES[tensor.datatype])


def raw_bytes(tensor: TensorHeader, values: np.ndarray) -> bytes:
    """An output's values as the protocol's raw bytes."""
    return values.astype(RAW_DTYPES[tensor.datatype], copy=False).tobytes()


def statistics(plane: DataPlane, model: str, version: str) -> inference_pb2.ModelStatisticsResponse:
    """Triton's ModelStatistics: of every served version (no model named), of every served
    version of `model` (no version), or of one version; ModelNotFound otherwise."""
    if version or model:
        plane.resolve(model, version)  # ModelNotFound naming what is served
    chosen = [
        served
        for served in plane.served()
        if (not model or served.name == model) and (not version or served.version == version)
    ]
    return inference_pb2.ModelStatisticsResponse(model_stats=[_statistics(s) for s in chosen])


def _statistics(served: ServedVersion) -> inference_pb2.ModelStatistics:
    stats = served.statistics
    computed = stats.compute_infer

    def duration(d: Duration) -> inference_pb2.StatisticDuration:
        return inference_pb2.StatisticDuration(count=d.count, ns=d.ns)

    def unmeasured(count: int) -> inference_pb2.StatisticDuration:
        return inference_pb2.StatisticDuration(count=count, ns=0)  # statistics.py says why

    return inference_pb2.ModelStatistics(
        name=served.name,
        version=served.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=inference_pb2.InferStatistics(
            success=duration(stats.success),
            fail=duration(stats.fail),
            queue=duration(stats.queue),
            compute_input=unmeasured(computed.count),
            compute_infer=duration(computed),
            compute_output=unmeasured(computed.count),
            cache_hit=inference_pb2.StatisticDuration(),
            cache_miss=inference_pb2.StatisticDuration(),
        ),
        batch_stats=[
            inference_pb2.InferBatchStatistics(
                batch_size=size,
                compute_input=unmeasured(run.count),
                compute_infer=duration(run),
                compute_output=unmeasured(run.count),
            )
            for size, run in sorted(stats.batches.items())
        ],
    )


_INTEGERS = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def as_json(message: Message) -> dict[str, Any]:
    """A message as Triton's REST routes give it: proto field names, every field (defaults
    too), enums by name, and 64-bit integers as JSON numbers (protobuf's JSON mapping writes
    them as strings; Triton's server, and clients reading dims or counts, use numbers)."""
    return _numbers(
        message,
        MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        ),
    )


def _numbers(message: Message, data: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            if entry.message_type is not None:
                mapping = getattr(message, field.name)
                data[field.name] = {
                    k: _numbers(mapping[_key(k, mapping)], v) for k, v in value.items()
                }
            elif entry.type in _INTEGERS:
                data[field.name] = {k: int(v) for k, v in value.items()}
        elif field.message_type is not None:
            items = getattr(message, field.name)
            if _repeated(field):
                data[field.name] = [_numbers(m, d) for m, d in zip(items, value, strict=True)]
            else:
                data[field.name] = _numbers(items, value)
        elif field.type in _INTEGERS:
            data[field.name] = [int(v) for v in value] if _repeated(field) else int(value)
    return data


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6.31 deprecates `label`
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _key(text: str, mapping: Any) -> Any:
    """A map key as the JSON mapping wrote it (always a string) -> the map's own key."""
    for key in mapping:
        if str(key) == text or (isinstance(key, bool) and str(key).lower() == text):
            return key
    raise KeyError(text)
