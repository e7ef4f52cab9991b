"""The Keras MLP and its training loop (TensorFlow imported here and in export.py only)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from digit_recognizer.protos.contract import IMAGE_SIDE, INPUT_NAME, OUTPUT_NAME, PIXELS_PER_IMAGE
from digit_recognizer.trainer.augment import Distorter, Distortion
from digit_recognizer.trainer.config import TrainConfig
from digit_recognizer.trainer.data import Dataset, to_model_inputs


@dataclass(frozen=True)
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    test_probabilities: np.ndarray
    train_seconds: float


FEATURES = "features"  # the convolutions' flattened output, which the detector shares


def build_model(config: TrainConfig) -> keras.Model:
    pixels = keras.Input(shape=(PIXELS_PER_IMAGE,), name=INPUT_NAME)
    hidden = pixels
    if config.conv:
        hidden = keras.layers.Reshape((IMAGE_SIDE, IMAGE_SIDE, 1), name="image")(hidden)
        for i, filters in enumerate(config.conv, start=1):
            hidden = keras.layers.Conv2D(
                filters, 3, activation=config.activation, name=f"conv_{i}"
            )(hidden)
            hidden = keras.layers.MaxPooling2D(name=f"pool_{i}")(hidden)
        hidden = keras.layers.Flatten(name=FEATURES)(hidden)
    for i, width in enumerate(config.hidden, start=1):
        hidden = keras.layers.Dense(width, activation=config.activation, name=f"hidden_{i}")(hidden)
        if config.dropout > 0:
            hidden = keras.layers.Dropout(config.dropout, name=f"dropout_{i}")(hidden)
    probabilities = keras.layers.Dense(config.num_classes, activation="softmax", name=OUTPUT_NAME)(
        hidden
    )
    model = keras.Model(pixels, probabilities, name="digits_cnn" if config.conv else "digits_mlp")
    return model


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.get(config.optimizer)
    if config.learning_rate is None and config.lr_schedule == "constant":
        return optimizer
    base_rate = config.learning_rate or float(optimizer.learning_rate)
    rate: float | keras.optimizers.schedules.LearningRateSchedule = base_rate
    if config.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(base_rate, steps_per_epoch * config.epochs)
    return type(optimizer)(learning_rate=rate)


def weights_sha256(model: keras.Model) -> str:
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
    return digest.hexdigest()


class _EpochLine(keras.callbacks.Callback):
    """One line per epoch, numbered against the whole run (fit sees one epoch at a time)."""

    def __init__(self, epochs: int, log: Callable[[str], None]) -> None:
        super().__init__()
        self._epochs = epochs
        self._log = log
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        metrics = ", ".join(f"{key} {value:.4f}" for key, value in (logs or {}).items())
        seconds = time.perf_counter() - self._started
        self._log(f"epoch {epoch + 1}/{self._epochs}: {metrics} ({seconds:.1f} s)")


def train(
    config: TrainConfig,
    dataset: Dataset,
    log: Callable[[str], None],
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainResult:
    """Fit one epoch at a time so augmented runs see freshly distorted digits every epoch.
    `extra`: more training images already in model-input form ((N, 784) float32) with their
    labels (the typed digits), joined to every epoch's MNIST images (never distorted)."""
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(config.seed)

    x_train, y_train = dataset.x_train, dataset.y_train
    validation = None
    if config.validation_split > 0:
        # Like Keras's own validation_split: the last fraction, taken before any shuffling.
        cut = int(len(x_train) * (1.0 - config.validation_split))
        validation = (
            to_model_inputs(x_train[cut:]),
            keras.utils.to_categorical(y_train[cut:], config.num_classes),
        )
        x_train, y_train = x_train[:cut], y_train[:cut]
    targets = keras.utils.to_categorical(y_train, config.num_classes)
    if extra is not None and len(extra[0]):
        targets = np.concatenate(
            [targets, keras.utils.to_categorical(extra[1], config.num_classes)]
        )
    distorter = Distorter(Distortion(), IMAGE_SIDE, rng) if config.augment else None

    model = build_model(config)
    steps_per_epoch = -(-len(targets) // config.batch_size)
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=config.loss,
        metrics=["accuracy"],
    )
    history: dict[str, list[float]] = {}
    started = time.perf_counter()

    def joined(images: np.ndarray) -> np.ndarray:
        mnist = to_model_inputs(images)
        return np.concatenate([mnist, extra[0]]) if extra is not None and len(extra[0]) else mnist

    inputs = joined(x_train)
    for epoch in range(config.epochs):
        if distorter is not None:
            inputs = joined(distorter(x_train))
        fitted = model.fit(
            inputs,
            targets,
            batch_size=config.batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            validation_data=validation,
            verbose=0,
            callbacks=[_EpochLine(config.epochs, log)],
        )
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    train_seconds = time.perf_counter() - started

    x_test = to_model_inputs(dataset.x_test)
    y_test = keras.utils.to_categorical(dataset.y_test, config.num_classes)
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    probabilities = model.predict(x_test, batch_size=1024, verbose=0)
    log(f"test accuracy {test_accuracy:.4f}, loss {test_loss:.4f} ({train_seconds:.1f} s training)")
    return TrainResult(
        model=model,
        history=history,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        test_probabilities=probabilities,
        train_seconds=train_seconds,
    )
