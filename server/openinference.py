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
from digit_recognizer.server.dataplane import DataPlane, ServedVersion
from digit_recognizer.server.validation import invalid, to_images

PLATFORM = "onnxruntime_onnx"
FP32 = "FP32"
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
        outputs=(TensorHeader(model.output_name, FP32, (-1, len(served.labels))),),
    )


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
    if tensor.name != model.input_name or tensor.datatype != FP32:
        raise invalid(
            "inputs[0]",
            f"expected input {model.input_name!r} of datatype FP32, got {tensor.name!r} "
            f"{tensor.datatype or '(no datatype)'}",
        )
    for wanted in outputs:
        if wanted != model.output_name:
            raise invalid(
                "outputs", f"unknown output {wanted!r}; the model has {model.output_name!r}"
            )
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != PIXELS_PER_IMAGE or shape[0] < 1:
        raise invalid(
            "inputs[0].shape",
            f"expected shape [N, {PIXELS_PER_IMAGE}] with N >= 1, got {shape}",
        )
    return shape[0]


def to_pixels(field: str, images: int, values: np.ndarray, max_images: int) -> np.ndarray:
    """Flat float32 values for `images` images -> checked (N, 784) pixels."""
    if values.size != images * PIXELS_PER_IMAGE:
        raise invalid(
            field,
            f"shape [{images}, {PIXELS_PER_IMAGE}] needs {images * PIXELS_PER_IMAGE} values, "
            f"got {values.size}",
        )
    return to_images("inputs[0]", values, max_images, check_range=True)
