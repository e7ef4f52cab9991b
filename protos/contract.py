"""The input contract and the model card: what trainer, server and client agree on.

The contract: an image is IMAGE_SIDE x IMAGE_SIDE pixels, row-major, float32 in [0, 1],
0 = background, 1 = ink (MNIST's light-on-dark). The model card is what a model file says
about itself, stored in ONNX `metadata_props`.

Pure standard library on purpose: the server reads cards through onnxruntime's
`custom_metadata_map` and must not need TensorFlow or the `onnx` package to do it; the
client needs neither.
Each field is one metadata key; structured fields are JSON so that any ONNX tool
(Netron, `onnx.load`, onnxruntime) shows them readably.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
# Optional second output: how much each input looks like one digit, calibrated, in [0, 1];
# the model card's `detector` holds the threshold (models trained before it have neither).
SCORE_NAME = "digit_score"
IMAGE_SIDE = 28
PIXELS_PER_IMAGE = IMAGE_SIDE * IMAGE_SIDE
PIXEL_RANGE = (0.0, 1.0)
BACKGROUND = 0.0
DEFAULT_LABELS = tuple(str(d) for d in range(10))
INPUT_CONTRACT: dict[str, Any] = {
    "name": INPUT_NAME,
    "shape": [-1, PIXELS_PER_IMAGE],
    "dtype": "float32",
    "layout": f"{IMAGE_SIDE}x{IMAGE_SIDE} row-major",
    "range": list(PIXEL_RANGE),
    "background": BACKGROUND,
    "ink": 1.0,
}
_JSON_FIELDS = {"labels", "training_config", "input_contract", "library_versions", "detector"}
_OPTIONAL_FIELDS = {"detector"}  # cards written before it existed stay valid
_FLOAT_FIELDS = {"test_accuracy", "test_loss"}


class CardError(Exception):
    """A model file's metadata is missing or not a valid model card."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    weights_sha256: str
    test_accuracy: float
    test_loss: float
    labels: tuple[str, ...]
    dataset: str
    created_at: str
    training_config: dict[str, Any] = field(default_factory=dict)
    library_versions: dict[str, str] = field(default_factory=dict)
    input_contract: dict[str, Any] = field(default_factory=lambda: dict(INPUT_CONTRACT))
    detector: dict[str, Any] = field(default_factory=dict)  # {} = no not-a-digit detector

    @property
    def digit_threshold(self) -> float | None:
        """The digit score from which an input counts as a digit; None without a detector."""
        threshold = self.detector.get("threshold")
        return float(threshold) if isinstance(threshold, int | float) else None

    def to_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in asdict(self).items():
            if key in _JSON_FIELDS:
                out[key] = json.dumps(list(value) if key == "labels" else value, sort_keys=True)
            else:
                out[key] = repr(value) if isinstance(value, float) else str(value)
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ModelCard:
        missing = [
            f.name for f in fields(cls) if f.name not in metadata and f.name not in _OPTIONAL_FIELDS
        ]
        if missing:
            raise CardError(f"model card incomplete: missing {', '.join(missing)}")
        values: dict[str, Any] = {}
        try:
            for f in fields(cls):
                if f.name not in metadata:  # an optional field this card predates
                    continue
                raw = metadata[f.name]
                if f.name in _JSON_FIELDS:
                    values[f.name] = json.loads(raw)
                elif f.name in _FLOAT_FIELDS:
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
        except ValueError as exc:
            raise CardError(f"model card field {f.name!r} is malformed: {exc}") from None
        values["labels"] = tuple(str(label) for label in values["labels"])
        if not isinstance(values.get("detector", {}), dict):
            raise CardError("model card field 'detector' is malformed: not a JSON object")
        return cls(**values)
