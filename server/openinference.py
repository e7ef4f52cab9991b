"""The Open Inference Protocol (KServe v2) without a transport: what its gRPC front (oip.py)
and its REST routes (http.py) share. Tensors arrive as (name, datatype, shape) headers plus
values; these checks turn them into validated (N, 784) images or an InvalidInput that names
the field, with the same messages on both transports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from digit_recognizer.protos.contract import PIXELS_PER_IMAGE
from digit_recognizer.server.dataplane import Classified, DataPlane, ServedVersion
from digit_recognizer.server.validation import invalid, to_images

PLATFORM = "onnxruntime_onnx"
FP32 = "FP32"
UINT8 = "UINT8"  # 0-255 pixels, a quarter of the bytes: what 8-bit pictures and IDX files hold
BYTES_PER_VALUE = {FP32: 4, UINT8: 1}
BOOL = "BOOL"
IS_DIGIT = "is_digit"  # the detector's verdict; its score is the model's SCORE_NAME output
SERVER_NAME = "digit-recognizer"
EXTENSIONS = ("model_repository",)  # Triton's name for the RepositoryIndex extension


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
