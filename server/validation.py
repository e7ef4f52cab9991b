"""Turning a ClassifyRequest into an (N, 784) float32 array, or an actionable InvalidInput."""

from __future__ import annotations

import numpy as np

from digit_recognizer.protos import digits_pb2
from digit_recognizer.protos.contract import PIXELS_PER_IMAGE
from digit_recognizer.server.errors import InvalidInput, Violation

MAX_REQUEST_ID_CHARS = 128
ENCODINGS = ("pixels", "pixels_f32le", "pixels_u8")
_BYTES_PER_VALUE = {"pixels": 4, "pixels_f32le": 4, "pixels_u8": 1}
_LITTLE_ENDIAN_F32 = np.dtype("<f4")


def max_message_bytes(max_images_per_request: int) -> int:
    """The largest valid request, plus room for the small fields and protobuf framing."""
    return max_images_per_request * PIXELS_PER_IMAGE * 4 + 64 * 1024


def parse_request(
    request: digits_pb2.ClassifyRequest, max_images: int, num_classes: int
) -> np.ndarray:
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid(
            "request_id",
            f"request_id has {len(request.request_id)} characters; at most "
            f"{MAX_REQUEST_ID_CHARS} are allowed",
        )
    if request.top_k > num_classes:
        raise invalid("top_k", f"top_k is {request.top_k}; this model has {num_classes} classes")
    # Read each field once: reading a bytes field copies it (800 KB for 256 images).
    fields = {name: getattr(request, name) for name in ENCODINGS}
    present = [name for name, value in fields.items() if len(value)]
    if not present:
        raise invalid(
            "pixels",
            "the request holds no images: set one of pixels, pixels_f32le or pixels_u8 "
            f"to N*{PIXELS_PER_IMAGE} values (28x28 row-major)",
        )
    if len(present) > 1:
        raise invalid(present[1], f"set only one image encoding; got {' and '.join(present)}")
    encoding = present[0]
    values = _decode(encoding, fields[encoding])
    return to_images(encoding, values, max_images, check_range=encoding != "pixels_u8")


def to_images(field: str, values: np.ndarray, max_images: int, check_range: bool) -> np.ndarray:
    """Flat values -> (N, 784) float32, or InvalidInput naming `field` and what is wrong."""
    if values.size % PIXELS_PER_IMAGE:
        images, extra = divmod(values.size, PIXELS_PER_IMAGE)
        raise invalid(
            field,
            f"{field} holds {values.size} values, not a multiple of {PIXELS_PER_IMAGE} "
            f"(28x28): {images} whole image(s) and {extra} value(s) left over"
            + (f"; image 0 needs exactly {PIXELS_PER_IMAGE}" if images == 0 else ""),
        )
    pixels = values.reshape(-1, PIXELS_PER_IMAGE)
    if len(pixels) > max_images:
        raise invalid(
            field,
            f"the request holds {len(pixels)} images; at most {max_images} are allowed per "
            "request (split it, or use ClassifyStream)",
        )
    if check_range:
        _check_range(field, pixels)
    return pixels


def _decode(encoding: str, raw: bytes | object) -> np.ndarray:
    if encoding == "pixels":
        return np.asarray(raw, dtype=np.float32)
    assert isinstance(raw, bytes)
    width = _BYTES_PER_VALUE[encoding]
    if len(raw) % width:
        raise invalid(
            encoding,
            f"{encoding} holds {len(raw)} bytes, not a multiple of {width} "
            f"(each image is {PIXELS_PER_IMAGE * width} bytes)",
        )
    if encoding == "pixels_u8":
        return np.frombuffer(raw, dtype=np.uint8).astype(np.float32) * np.float32(1 / 255)
    return np.frombuffer(raw, dtype=_LITTLE_ENDIAN_F32).astype(np.float32, copy=False)


def _check_range(encoding: str, pixels: np.ndarray) -> None:
    # Fast path: two reductions. NaN propagates through min/max and fails both comparisons.
    if pixels.min() >= 0.0 and pixels.max() <= 1.0:
        return
    bad = ~((pixels >= 0.0) & (pixels <= 1.0))  # `not (0 <= x <= 1)` is also true for NaN
    violations = []
    for image in np.flatnonzero(bad.any(axis=1))[:10]:
        index = int(np.flatnonzero(bad[image])[0])
        value = float(pixels[image, index])
        violations.append(
            Violation(
                f"{encoding}[{image * PIXELS_PER_IMAGE + index}]",
                f"image {image}, pixel {index} (row {index // 28}, column {index % 28}) is "
                f"{value}; pixels must be finite float32 values in [0, 1] (0 = background, "
                "1 = ink)",
            )
        )
    images = int(bad.any(axis=1).sum())
    message = violations[0].description
    if images > 1:
        message += f" ({images} images have out-of-range values)"
    raise InvalidInput(message, violations)


def invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(message, [Violation(field, message)])
