"""`--report DIR`: training curves, confusion matrix and the worst mistakes, as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np


def write_report(
    directory: Path,
    history: dict[str, list[float]],
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: tuple[str, ...],
    detector_scores: dict[str, tuple[bool, np.ndarray]] | None = None,
    threshold: float | None = None,
    worst_count: int = 36,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [
        _curves(directory / "training_curves.png", history),
        _confusion(directory / "confusion_matrix.png", labels, probabilities, class_names),
        _worst(
            directory / "worst_errors.png", images, labels, probabilities, class_names, worst_count
        ),
    ]
    if detector_scores and threshold is not None:
        paths.append(_scores(directory / "digit_scores.png", detector_scores, threshold))
    return paths


def _scores(path: Path, scores: dict[str, tuple[bool, np.ndarray]], threshold: float) -> Path:
    """Held-out digit scores per kind of picture, digits above, non-digits below."""
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    bins = np.linspace(0, 1, 41)
    panels = (
        (axes[0], True, "digits (kept when >= threshold)"),
        (axes[1], False, "not digits (rejected when < threshold)"),
    )
    for ax, wanted, title in panels:
        for name, (is_digit, values) in scores.items():
            if is_digit == wanted and len(values):
                share = (values >= threshold).mean() if wanted else (values < threshold).mean()
                ax.hist(values, bins=bins, histtype="step", linewidth=1.5,
                        label=f"{name} ({share:.1%})")  # fmt: skip
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[1].set_xlabel(f"digit score (threshold {threshold:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curves(path: Path, history: dict[str, list[float]]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-o"), (f"val_{metric}", "--s")):
            if key in history:
                epochs = range(1, len(history[key]) + 1)
                ax.plot(epochs, history[key], style, label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _confusion(
    path: Path, labels: np.ndarray, probabilities: np.ndarray, names: tuple[str, ...]
) -> Path:
    k = len(names)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), probabilities.argmax(axis=1)), 1)
    fig, ax = plt.subplots(figsize=(0.6 * k + 3, 0.6 * k + 2.5))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    for (true, predicted), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if true == predicted else "black"
            ax.text(predicted, true, str(count), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"confusion matrix, accuracy {accuracy:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _worst(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    names: tuple[str, ...],
    count: int,
) -> Path:
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    # Most confidently wrong first: the mistakes a user would find most surprising.
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    columns = 6
    rows = max(1, -(-len(wrong) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[index], cmap="gray")
        ax.set_title(
            f"#{index} true {names[labels[index]]}\npred {names[predicted[index]]} "
            f"({probabilities[index, predicted[index]]:.2f})",
            fontsize=7,
        )
    fig.suptitle(f"{len(wrong)} most confident mistakes" if len(wrong) else "no mistakes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
