"""Realistic pictures made from MNIST digits, for tests, examples and accuracy checks.

`photo_style` turns a 28x28 MNIST digit into what a phone or scanner gives: dark ink on
light, slightly uneven paper, 3-10x larger, off-centre, with sensor noise; saved as PNG,
JPEG or RGBA with a transparent background. `python tests/pictures.py examples/` writes the
sample pictures shipped in examples/.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("png", "jpeg", "rgba")


def load_test_digits(mnist_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    images = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    x = np.frombuffer(images, np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    y = np.frombuffer(labels, np.uint8, offset=8)[:count]
    return x, y


def photo_style(digit: np.ndarray, rng: np.random.Generator, kind: str) -> Image.Image:
    """A 28x28 uint8 MNIST digit -> a large, off-centre, dark-on-light picture."""
    scale = rng.uniform(3, 10)
    side = round(28 * scale)
    ink = (
        np.asarray(
            Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), np.float32
        )
        / 255.0
    )
    ink = np.clip(ink, 0, 1)
    canvas_h, canvas_w = round(side * rng.uniform(1.2, 1.8)), round(side * rng.uniform(1.2, 2.0))
    top, left = rng.integers(0, canvas_h - side + 1), rng.integers(0, canvas_w - side + 1)
    full = np.zeros((canvas_h, canvas_w), np.float32)
    full[top : top + side, left : left + side] = ink
    if kind == "rgba":
        colour = np.array([20, 30, 90], np.float32)  # blue pen on a transparent canvas
        rgba = np.zeros((canvas_h, canvas_w, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = (full * 255).astype(np.uint8)
        return Image.fromarray(rgba, "RGBA")
    paper = rng.uniform(0.8, 0.95) + np.linspace(-0.05, 0.05, canvas_w)[None, :]  # uneven light
    ink_level = rng.uniform(0.05, 0.3)
    gray = paper * (1 - full) + ink_level * full
    gray += rng.normal(0, 0.02, gray.shape)
    tint = np.array([1.0, 0.97, 0.92], np.float32)  # warm paper, as phone photos are
    rgb = np.clip(gray[..., None] * tint * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def save(image: Image.Image, path: Path, kind: str) -> Path:
    if kind == "jpeg":
        path = path.with_suffix(".jpg")
        image.save(path, quality=75)
    else:
        path = path.with_suffix(".png")
        image.save(path)
    return path


def write_examples(directory: Path, mnist_dir: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    digits, labels = load_test_digits(mnist_dir, 10)
    rng = np.random.default_rng(2026)
    written = []
    for i in (0, 1, 2):
        name = f"mnist-{i}-label{labels[i]}"
        written.append(save(Image.fromarray(digits[i]), directory / name, "png"))
    for i, kind in zip((3, 4, 5, 6, 7, 8), KINDS * 2, strict=True):
        name = f"photo-{i}-label{labels[i]}-{kind}"
        written.append(save(photo_style(digits[i], rng, kind), directory / name, kind))
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples")
    data = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/mnist")
    for written_path in write_examples(out, data):
        print(written_path)
