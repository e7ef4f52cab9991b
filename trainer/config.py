"""Training configuration: the notebook's recipe as defaults, every knob it suggests as a field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from digit_recognizer.protos.contract import DEFAULT_LABELS

OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd", "nadam", "adagrad")
LOSSES = (
    "categorical_crossentropy",
    "mse",
    "mae",
    "categorical_hinge",
    "kl_divergence",
)
ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu", "selu", "gelu", "swish", "leaky_relu")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    # 3x3 convolutions (filters each, every one followed by 2x2 max pooling) before the dense
    # layers; empty: the notebook's MLP on the raw pixels.
    conv: tuple[int, ...] = ()
    hidden: tuple[int, ...] = (512,)
    activation: str = "relu"
    dropout: float = 0.0
    optimizer: str = "rmsprop"
    learning_rate: float | None = None  # None: the optimizer's Keras default (1e-3 for rmsprop)
    lr_schedule: str = "constant"
    loss: str = "categorical_crossentropy"
    epochs: int = 5
    batch_size: int = 128
    validation_split: float = 0.0
    augment: bool = False
    seed: int = 0
    labels: tuple[str, ...] = DEFAULT_LABELS
    # Typed digits drawn in the training fonts (trainer/pictures.py), mixed into the training
    # images: the notebook's MNIST-only MLP reads typed digits in unseen faces poorly (88.6%;
    # 6,000 of them: 93.9%, but MNIST test accuracy 0.9800 -> 0.9743 and +25 s), so 0 for now.
    typed_digits: int = 0

    def validate(self) -> list[str]:
        """Every problem, one line each; empty when the config is usable."""
        problems = []
        if len(self.conv) > 3 or any(filters < 1 for filters in self.conv):
            problems.append(
                f"--conv takes at most three positive filter counts (28x28 pools down to "
                f"1x1 after three), got {self.conv}"
            )
        if not self.hidden or any(width < 1 for width in self.hidden):
            problems.append(f"--hidden needs one or more positive widths, got {self.hidden}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"--activation {self.activation!r} is not one of {ACTIVATIONS}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            problems.append(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"--lr-schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.loss not in LOSSES:
            problems.append(f"--loss {self.loss!r} is not one of {LOSSES}")
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.validation_split < 1.0:
            problems.append(f"--validation-split must be in [0, 1), got {self.validation_split}")
        if self.typed_digits < 0:
            problems.append(f"--typed-digits must be at least 0, got {self.typed_digits}")
        if self.typed_digits and self.labels != DEFAULT_LABELS:
            problems.append("--typed-digits draws the digits 0-9: it needs the default labels")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            problems.append(f"--labels needs at least two distinct names, got {self.labels}")
        return problems

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NOTEBOOK = TrainConfig()

# Measured on the 2-core CI machine (see docs/training.md): two wide layers with dropout,
# Adam on a cosine decay, and fresh affine + elastic distortions every epoch.
BEST = replace(
    NOTEBOOK,
    hidden=(1024, 1024),
    dropout=0.2,
    optimizer="adam",
    learning_rate=1e-3,
    lr_schedule="cosine",
    epochs=20,
    augment=True,
)

# What `digit-train` with no flags trains (docs/training.md says why): a small convolutional
# classifier that also learns typed digits, so one served model reads photos of handwriting
# and print alike, and whose convolutions the not-a-digit detector shares (a dense head
# on them costs little beside the classifier).
DEFAULT = replace(
    NOTEBOOK,
    conv=(16, 32),
    hidden=(128,),
    optimizer="adam",
    epochs=3,
    typed_digits=6000,
)

PRESETS = {"notebook": NOTEBOOK, "default": DEFAULT, "best": BEST}
