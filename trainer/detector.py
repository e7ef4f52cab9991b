"""The not-a-digit detector: a small head beside the classifier, trained on made-up pictures.

The classifier is never touched (its layers are frozen and its weights hash is taken before);
the head reads the classifier's last hidden layer and its probabilities, plus, for a
convolutional classifier, its flattened convolutions (shared: the head adds two dense layers,
about a tenth of the classifier's arithmetic), or, for the notebook's MLP, the pixels through
two small convolutions of its own (8 and 16 filters), and says how much the input looks like
one digit. Its logit is calibrated on held-out pictures
(Platt scaling: score = sigmoid(a * logit + b)), and the threshold is the score that keeps
KEEP_DIGITS of the held-out digits. Both travel in the ONNX file: the score as a second
output, the threshold and the validation figures in the model card.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from scipy.optimize import minimize

from digit_recognizer.protos.contract import OUTPUT_NAME, PIXELS_PER_IMAGE, SCORE_NAME
from digit_recognizer.trainer.data import Dataset, to_model_inputs
from digit_recognizer.trainer.model import FEATURES
from digit_recognizer.trainer.pictures import (
    Drawing,
    PictureSet,
    font_names,
    start_drawing,
)

EPOCHS = 15
KEEP_DIGITS = 0.995  # of the held-out digit pictures, at the chosen threshold
HELD_OUT = 0.25


@dataclass(frozen=True)
class Detector:
    head: keras.Model  # pixels -> logit
    scale: float  # Platt: score = sigmoid(scale * logit + shift)
    shift: float
    threshold: float
    validation: dict[str, dict[str, Any]]  # set -> {"images", "is_digit", "share_right"}
    fonts: list[str]  # the typefaces the training pictures were drawn with
    held_out: dict[str, tuple[bool, np.ndarray]]  # set -> (is digit, scores): the report's plot

    def card(self) -> dict[str, object]:
        return {
            "output": SCORE_NAME,
            "threshold": round(self.threshold, 6),
            "calibration": {"method": "platt", "scale": self.scale, "shift": self.shift},
            "keep_digits": KEEP_DIGITS,
            "validation": self.validation,
            "fonts": self.fonts,
        }

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        logits = self.head.predict(pixels, batch_size=2048, verbose=0).reshape(-1)
        return _sigmoid(self.scale * logits + self.shift)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


PART = "detector_part"  # the trainable head inside the exported one


def _trainable_part(first_width: int, hidden_width: int, classes: int, shared: bool) -> keras.Model:
    """(pixels or the classifier's convolutions, its last hidden layer, its probabilities)
    -> logit."""
    first_name = "detector_features_in" if shared else "detector_pixels_in"
    first = keras.Input((first_width,), name=first_name)
    hidden = keras.Input((hidden_width,), name="detector_hidden_in")
    probabilities = keras.Input((classes,), name="detector_probabilities_in")
    if shared:
        # A convolutional classifier already holds local shapes (strokes, bowls, crossings):
        # a dense layer on its flattened convolutions is all the head adds. 128 units: held-out
        # letters 70% rejected with 64, 75% with 128, 77% with 256 (same pictures and keep
        # rate); fine-tuning the classifier's convolutions with the head did no better (72-79%).
        own = keras.layers.Dense(128, activation="relu", name="detector_shared")(first)
    else:
        # A small convolutional branch: letters differ from digits in local shapes (serifs,
        # bowls, crossings) that a dense layer on 784 pixels found poorly (held-out typed
        # letters: 65% rejected with a 128-unit dense branch, 88% with this, same threshold).
        # 8 and 16 filters: 16 and 32 rejected as much and cost 2.1x the bulk throughput.
        own = keras.layers.Reshape((28, 28, 1), name="detector_image")(first)
        for filters in (8, 16):
            own = keras.layers.Conv2D(
                filters, 3, activation="relu", name=f"detector_conv{filters}"
            )(own)
            own = keras.layers.MaxPooling2D(name=f"detector_pool{filters}")(own)
        own = keras.layers.Flatten(name="detector_flat")(own)
        own = keras.layers.Dense(64, activation="relu", name="detector_pixels")(own)
    features = keras.layers.Concatenate(name="detector_features")([own, hidden, probabilities])
    features = keras.layers.Dense(64, activation="relu", name="detector_hidden")(features)
    logit = keras.layers.Dense(1, name="detector_logit")(features)
    return keras.Model([first, hidden, probabilities], logit, name=PART)


def _last_hidden(classifier: keras.Model) -> keras.KerasTensor:
    return [layer for layer in classifier.layers if layer.name.startswith("hidden_")][-1].output


def _first_input(classifier: keras.Model) -> keras.KerasTensor:
    """What the head reads besides the hidden layer and probabilities: a convolutional
    classifier's own flattened convolutions, else the pixels."""
    names = {layer.name for layer in classifier.layers}
    return classifier.get_layer(FEATURES).output if FEATURES in names else classifier.input


def build_head(classifier: keras.Model) -> keras.Model:
    """pixels -> logit, through the (frozen) classifier's last hidden layer and output."""
    for layer in classifier.layers:
        layer.trainable = False
    hidden, first = _last_hidden(classifier), _first_input(classifier)
    part = _trainable_part(
        int(first.shape[-1]),
        int(hidden.shape[-1]),
        int(classifier.output.shape[-1]),
        shared=first is not classifier.input,
    )
    logit = part([first, hidden, classifier.output])
    return keras.Model(classifier.input, logit, name="digit_detector")


class _Progress(keras.callbacks.Callback):
    """A line at least every few seconds while the head is fitted."""

    def __init__(self, epochs: int, log: Callable[[str], None]) -> None:
        super().__init__()
        self.epochs, self.log, self.last = epochs, log, time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        now = time.perf_counter()
        if now - self.last >= 4 or epoch + 1 == self.epochs:
            loss = (logs or {}).get("loss", float("nan"))
            self.log(f"detector: fitting, epoch {epoch + 1}/{self.epochs} (loss {loss:.4f})")
            self.last = now


def _pixel_space_sets(
    x_train: np.ndarray, rng: np.random.Generator, count: int
) -> list[PictureSet]:
    """What API callers send without the client: MNIST digits as they are, and inputs that
    are not digits at all (blank, noise, inverted digits)."""
    chosen = x_train[rng.choice(len(x_train), min(count, len(x_train)), replace=False)]
    digits = to_model_inputs(chosen)
    blank = rng.uniform(0, 0.05, (count // 8, PIXELS_PER_IMAGE))
    blank *= rng.random((count // 8, 1)) < 0.5  # half of them all zeros
    noise = rng.random((count // 4, PIXELS_PER_IMAGE)) ** rng.uniform(1, 6, (count // 4, 1))
    inverted = 1.0 - digits[: count // 4]
    return [
        PictureSet("MNIST digits", True, digits, 0),
        PictureSet("blank, noise and inverted inputs", False,
                   np.concatenate([blank, noise, inverted]).astype(np.float32), 0),
    ]  # fmt: skip


def _split(
    sets: list[PictureSet], rng: np.random.Generator
) -> tuple[list[PictureSet], list[PictureSet]]:
    train, held = [], []
    for s in sets:
        order = rng.permutation(len(s.pixels))
        cut = int(len(order) * (1 - HELD_OUT))
        train.append(PictureSet(s.name, s.is_digit, s.pixels[order[:cut]], 0))
        held.append(PictureSet(s.name, s.is_digit, s.pixels[order[cut:]], s.unreadable))
    return train, held


def _stack(sets: list[PictureSet]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([s.pixels for s in sets])
    y = np.concatenate([np.full(len(s.pixels), float(s.is_digit), np.float32) for s in sets])
    return x, y


def _platt(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    def loss(params: np.ndarray) -> float:
        z = params[0] * logits + params[1]
        return float(np.mean(np.logaddexp(0, -z) * targets + np.logaddexp(0, z) * (1 - targets)))

    fitted = minimize(loss, np.array([1.0, 0.0]), method="Nelder-Mead")
    return float(fitted.x[0]), float(fitted.x[1])


def train_detector(
    classifier: keras.Model,
    dataset: Dataset,
    seed: int,
    pictures: int,
    log: Callable[[str], None],
    drawing: Drawing | None = None,
) -> Detector:
    """Make (or collect the `drawing` of) `pictures` pictures of each kind, fit the head,
    calibrate, pick the threshold."""
    rng = np.random.default_rng(seed + 17)
    if drawing is None:
        drawing = start_drawing(dataset.x_train, seed, pictures, log)
    sets = drawing.collect(log) + _pixel_space_sets(dataset.x_train, rng, 2 * pictures)
    train, held = _split(sets, rng)
    x, y = _stack(train)
    keras.utils.set_random_seed(seed)
    head = build_head(classifier)
    part = head.get_layer(PART)
    # The classifier is frozen: its hidden layer and probabilities are computed once here
    # rather than in every epoch of the fit (most of the head's arithmetic).
    features = keras.Model(
        classifier.input, [_first_input(classifier), _last_hidden(classifier), classifier.output]
    )
    first, hidden, probabilities = features.predict(x, batch_size=2048, verbose=0)
    positives = float(y.mean())
    part.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    log(f"detector: fitting the head on {len(x)} pictures, {EPOCHS} epochs")
    part.fit(
        [first, hidden, probabilities], y, batch_size=256, epochs=EPOCHS, verbose=0, shuffle=True,
        class_weight={0: 0.5 / (1 - positives), 1: 0.5 / positives},
        callbacks=[_Progress(EPOCHS, log)],
    )  # fmt: skip
    held_x, held_y = _stack(held)
    logits = head.predict(held_x, batch_size=2048, verbose=0).reshape(-1)
    scale, shift = _platt(logits, held_y)
    scores = _sigmoid(scale * logits + shift)
    threshold = float(np.quantile(scores[held_y == 1], 1 - KEEP_DIGITS))
    validation: dict[str, dict[str, Any]] = {}
    held_out: dict[str, tuple[bool, np.ndarray]] = {}
    offset = 0
    for s in held:
        mine = scores[offset : offset + len(s.pixels)]
        offset += len(s.pixels)
        held_out[s.name] = (s.is_digit, mine)
        right = (mine >= threshold) if s.is_digit else (mine < threshold)
        share = float(right.mean()) if len(mine) else 0.0
        validation[s.name] = {
            "images": len(mine),
            "is_digit": s.is_digit,
            "share_right": round(share, 4),
        }
        log(
            f"detector: {s.name}: {share:.1%} {'kept' if s.is_digit else 'rejected'} "
            f"({len(mine)} held-out pictures)"
        )
    log(f"detector: threshold {threshold:.4f} keeps {KEEP_DIGITS:.1%} of held-out digits")
    return Detector(head, scale, shift, threshold, validation, font_names(drawing.fonts), held_out)


def exported_function(
    classifier: keras.Model, detector: Detector | None
) -> tf.types.experimental.GenericFunction:
    """The graph tf2onnx converts: probabilities, and the calibrated digit score when there
    is a detector."""

    def forward(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = {OUTPUT_NAME: classifier(pixels, training=False)}
        if detector is not None:
            logit = tf.reshape(detector.head(pixels, training=False), [-1])
            outputs[SCORE_NAME] = tf.sigmoid(detector.scale * logit + detector.shift)
        return outputs

    return tf.function(forward)
