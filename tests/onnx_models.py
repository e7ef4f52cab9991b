"""Small ONNX models built with onnx.helper, so server tests need no TensorFlow.

`tiny_model`: class k scores the ink on pixels whose index % 10 == k, so an image with only
pixel k lit is classified as k (with `shift`, as k + shift: a model that answers otherwise).
`slow_model`: the same answers behind wide layers that make each image cost ~20 MFLOP, for
tests that need requests to stay in flight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from digit_recognizer.protos.contract import ModelCard

CARD = ModelCard(
    name="tiny",
    version="1",
    weights_sha256="0" * 64,
    test_accuracy=0.5,
    test_loss=1.0,
    labels=tuple(str(d) for d in range(10)),
    dataset="synthetic",
    created_at="2026-11-25T00:00:00+00:00",
    training_config={"hidden": []},
    library_versions={},
)


def one_hot_image(digit: int) -> np.ndarray:
    image = np.zeros(784, np.float32)
    image[digit] = 1.0
    return image


def _model(
    nodes: list[onnx.NodeProto],
    weights: dict[str, np.ndarray],
    card: ModelCard | None,
    input_width: int = 784,
    output_width: int = 10,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", input_width])],
        [
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, ["batch", output_width]
            )
        ],
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if card is not None:
        for key, value in card.to_metadata().items():
            model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def _scoring_weights(input_width: int = 784, classes: int = 10, shift: int = 0) -> np.ndarray:
    weights = np.zeros((input_width, classes), np.float32)
    weights[np.arange(input_width), (np.arange(input_width) + shift) % classes] = 10.0
    return weights


def tiny_model(
    card: ModelCard | None = CARD, input_width: int = 784, output_width: int = 10, shift: int = 0
) -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("MatMul", ["pixels", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        {"w": _scoring_weights(input_width, output_width, shift)},
        card,
        input_width,
        output_width,
    )


def slow_model(card: ModelCard = CARD, width: int = 2048) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return _model(
        [
            helper.make_node("MatMul", ["pixels", "w1"], ["h1"]),
            helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w3"], ["h3"]),
            # Zero-weighted, so the answers stay those of tiny_model.
            helper.make_node("Mul", ["h3", "zero"], ["h3_zero"]),
            helper.make_node("MatMul", ["pixels", "w"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "h3_zero"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        {
            "w1": rng.standard_normal((784, width), np.float32) * 0.01,
            "w2": rng.standard_normal((width, width), np.float32) * 0.01,
            "w3": rng.standard_normal((width, 10), np.float32) * 0.01,
            "zero": np.zeros((1, 10), np.float32),
            "w": _scoring_weights(),
        },
        card,
    )


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path
