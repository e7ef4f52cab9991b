"""Keras -> ONNX with tf2onnx, proven equal to Keras before a byte reaches the target path."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

from digit_recognizer.protos.contract import (
    INPUT_NAME,
    OUTPUT_NAME,
    PIXELS_PER_IMAGE,
    SCORE_NAME,
    ModelCard,
)
from digit_recognizer.trainer.detector import Detector, exported_function

# 17 is the oldest opset with everything this graph needs that every maintained runtime
# (onnxruntime >= 1.13, TensorRT 8.6, OpenVINO, onnx.js) executes; nothing newer buys us anything.
OPSET = 17
BATCH_DIM = "batch"
MAX_ABS_DIFF = 1e-5


class ParityError(Exception):
    """onnxruntime and Keras disagree; the exported file must not be used."""


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_diff: float
    argmax_disagreements: int
    max_score_diff: float = 0.0  # the digit score's, when the model has a detector

    @property
    def ok(self) -> bool:
        return (
            self.argmax_disagreements == 0
            and self.max_abs_diff <= MAX_ABS_DIFF
            and self.max_score_diff <= MAX_ABS_DIFF
        )


def to_onnx(
    model: keras.Model, card: ModelCard, detector: Detector | None = None
) -> onnx.ModelProto:
    # from_keras breaks on Keras 3; a tf.function with a named signature converts cleanly, and
    # returning a dict names the graph outputs instead of leaking op names ("Identity:0").
    signature = [tf.TensorSpec([None, PIXELS_PER_IMAGE], tf.float32, name=INPUT_NAME)]
    forward = exported_function(model, detector)
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=OPSET)
    # A dict's outputs come out in key order (digit_score before probabilities); callers doing
    # `session.run(None, feed)[0]` (the common idiom, and the model before the detector) must
    # still get the probabilities, so they are output 0 and the detector's outputs follow.
    ordered = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in proto.graph.output]
    ordered.sort(key=lambda value: value.name != OUTPUT_NAME)
    del proto.graph.output[:]
    proto.graph.output.extend(ordered)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    proto.graph.name = card.name
    proto.doc_string = (
        f"{card.name} {card.version}: {INPUT_NAME} float32 [{BATCH_DIM}, {PIXELS_PER_IMAGE}] "
        f"(28x28 row-major, 0 = background, 1 = ink) -> {OUTPUT_NAME} [{BATCH_DIM}, "
        f"{len(card.labels)}] over labels {', '.join(card.labels)}"
        + (
            f"; {SCORE_NAME} [{BATCH_DIM}] in [0, 1], a digit from {card.digit_threshold}"
            if detector is not None
            else ""
        )
    )
    proto.model_version = int(card.version) if card.version.isdigit() else 0
    del proto.metadata_props[:]
    for key, value in card.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_parity(
    model_bytes: bytes,
    inputs: np.ndarray,
    keras_probabilities: np.ndarray,
    keras_scores: np.ndarray | None = None,
) -> Parity:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [OUTPUT_NAME] + ([SCORE_NAME] if keras_scores is not None else [])
    outputs = session.run(names, {INPUT_NAME: inputs})
    onnx_probabilities = outputs[0]
    score_diff = (
        float(np.max(np.abs(outputs[1] - keras_scores))) if keras_scores is not None else 0.0
    )
    return Parity(
        images=len(inputs),
        max_abs_diff=float(np.max(np.abs(onnx_probabilities - keras_probabilities))),
        argmax_disagreements=int(
            np.sum(onnx_probabilities.argmax(axis=1) != keras_probabilities.argmax(axis=1))
        ),
        max_score_diff=score_diff,
    )


def export(
    model: keras.Model,
    card: ModelCard,
    path: Path,
    inputs: np.ndarray,
    keras_probabilities: np.ndarray,
    detector: Detector | None = None,
) -> Parity:
    """Convert, check parity on `inputs`, and only then write `path` atomically."""
    model_bytes = to_onnx(model, card, detector).SerializeToString()
    scores = detector.scores(inputs) if detector is not None else None
    parity = check_parity(model_bytes, inputs, keras_probabilities, scores)
    if not parity.ok:
        raise ParityError(
            f"ONNX disagrees with Keras on {parity.images} images: max |diff| "
            f"{parity.max_abs_diff:.2e} (digit score {parity.max_score_diff:.2e}; limit "
            f"{MAX_ABS_DIFF:.0e}), {parity.argmax_disagreements} different predictions; "
            f"{path} not written"
        )
    write_atomically(path, model_bytes)
    return parity


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (same-directory rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
