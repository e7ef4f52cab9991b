"""Pictures as people take them, through a real server: digits kept, non-digits rejected,
numbers read.

    python -m bench.pictures --model models/model.onnx --out docs/pictures.json

Every set is made here, never downloaded, and none was seen in training: MNIST *test* digits
(photographed, and written side by side as numbers), the fonts the trainer holds out, and
scikit-learn's 8x8 digits (other writers; skipped when scikit-learn is missing). Each picture
goes through the client library exactly as `digit-client classify` / `read` sends it.
"""

from __future__ import annotations

import json
import string
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from bench import servers
from digit_recognizer.client import DigitClient
from digit_recognizer.client.errors import ImageError
from digit_recognizer.client.images import quantized, to_mnist
from digit_recognizer.trainer import pictures as drawn
from digit_recognizer.trainer.data import load_dataset, resolve_data_dir

# The pieces-and-pairs kinds train the detector for reading; the targets are about things
# people photograph instead of a digit, so those are reported apart.
CORE_NON_DIGITS = ("typed letters and symbols", "scribbles", "textures and ruled paper")


def other_writers(rng: np.random.Generator, count: int) -> list[Image.Image] | None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    images = load_digits().images  # (1797, 8, 8), 0..16
    chosen = images[rng.choice(len(images), min(count, len(images)), replace=False)]
    pictures = []
    for image in chosen:
        big = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize(
            (20, 20), Image.Resampling.BICUBIC
        )
        frame = np.zeros((28, 28), np.uint8)
        frame[4:24, 4:24] = np.asarray(big)
        pictures.append(drawn.photo_of(frame, rng))
    return pictures


def kept_or_rejected(
    client: DigitClient, pictures: list[Image.Image], is_digit: bool
) -> dict[str, float | int]:
    rows, unreadable = [], 0
    for picture in pictures:
        try:
            rows.append(to_mnist(picture))
        except ImageError:  # blank: the client says "no digit found" before any request
            unreadable += 1
    verdicts = [p.looks_like_a_digit for p in client.classify_many(quantized(np.stack(rows)))]
    right = sum(v == is_digit for v in verdicts) + (0 if is_digit else unreadable)
    return {"pictures": len(pictures), "share_right": round(right / len(pictures), 4)}


def numbers(
    client: DigitClient, digits: np.ndarray, labels: np.ndarray, fonts: list,
    rng: np.random.Generator, count: int,
) -> dict[str, dict[str, float | int]]:  # fmt: skip
    results: dict[str, dict[str, float | int]] = {}
    for kind in ("handwritten", "typed"):
        exact, seconds = 0, []
        for _ in range(count):
            length = int(rng.integers(2, 7))
            if kind == "handwritten":
                chosen = rng.choice(len(digits), length)
                picture = drawn.number_of(list(digits[chosen]), rng)
                truth = "".join(str(labels[i]) for i in chosen)
            else:
                truth = "".join(rng.choice(list(string.digits), length))
                picture = drawn.typed(truth, fonts[rng.integers(len(fonts))], rng)
            started = time.perf_counter()
            reading = client.read(picture)
            seconds.append(time.perf_counter() - started)
            exact += reading.text == truth
        results[kind] = {
            "pictures": count,
            "exact": round(exact / count, 4),
            "read_p50_ms": round(float(np.median(seconds)) * 1e3, 2),
        }
    return results


@click.command()
@click.option("--model", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--data-dir", default=None, help="MNIST (default: the trainer's search order)")
@click.option("--count", type=int, default=500, show_default=True, help="pictures per set")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="also write the figures as JSON")
def main(model: Path, data_dir: str | None, count: int, seed: int, out: Path | None) -> None:
    """Digits kept and non-digits rejected, and numbers read, by a server with MODEL."""
    rng = np.random.default_rng(seed)
    dataset = load_dataset(resolve_data_dir(data_dir))
    _, held_fonts = drawn.split_fonts(drawn.package_fonts())
    x_test, y_test = dataset.x_test, dataset.y_test

    def some(draw, n: int = count) -> list[Image.Image]:  # noqa: ANN001
        return [draw() for _ in range(n)]

    def test_digit() -> np.ndarray:
        return x_test[rng.integers(len(x_test))]

    def held_typed(glyphs: str):  # noqa: ANN202
        return lambda: drawn.typed(
            glyphs[rng.integers(len(glyphs))], held_fonts[rng.integers(len(held_fonts))], rng
        )

    digit_sets = {
        "MNIST test digits on paper": some(lambda: drawn.photo_of(test_digit(), rng)),
        "typed digits (held-out fonts)": some(held_typed(string.digits)),
    }
    writers = other_writers(rng, count)
    if writers is not None:
        digit_sets["scikit-learn 8x8 digits (other writers)"] = writers
    non_digit_sets = {
        "typed letters and symbols": some(held_typed(drawn.NON_DIGIT_GLYPHS)),
        "scribbles": some(lambda: drawn.scribble(rng)),
        "textures and ruled paper": some(lambda: drawn.texture(rng), count // 2),
        "pieces of digits": some(lambda: drawn.piece_of(test_digit(), rng), count // 2),
        "pairs of digits": some(lambda: drawn.pair_of(test_digit(), test_digit(), rng), count // 2),
    }
    port = servers.free_port()
    server = servers.ours("digit-server", model, "", port, "--workers", "1")
    with (
        servers.running(
            server, port, Path("reports/bench/logs"), x_test[:2].reshape(2, -1) / 255.0
        ),
        DigitClient(f"127.0.0.1:{port}", timeout=60) as client,
    ):
        record: dict = {"model": str(model), "seed": seed, "digits": {}, "non_digits": {}}
        for name, pictures in digit_sets.items():
            record["digits"][name] = kept_or_rejected(client, pictures, True)
        for name, pictures in non_digit_sets.items():
            record["non_digits"][name] = kept_or_rejected(client, pictures, False)
        record["numbers"] = numbers(client, x_test, y_test, held_fonts, rng, count)
    kept = list(record["digits"].values())
    core = [record["non_digits"][name] for name in CORE_NON_DIGITS]
    record["digits_kept"] = round(
        sum(r["share_right"] * r["pictures"] for r in kept) / sum(r["pictures"] for r in kept), 4
    )
    record["non_digits_rejected"] = round(
        sum(r["share_right"] * r["pictures"] for r in core) / sum(r["pictures"] for r in core), 4
    )
    text = json.dumps(record, indent=1)
    click.echo(text)
    if out is not None:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
