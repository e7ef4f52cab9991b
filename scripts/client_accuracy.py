"""How well `digit-client classify` reads real pictures, measured through a running server.

    python scripts/client_accuracy.py --target localhost:50051 [--count 1000]

Writes three picture sets to a temporary directory, classifies each with the CLI (--json),
and prints the accuracy of each next to the model's raw accuracy on the same digits:
  (a) MNIST test digits as 28x28 PNG files,
  (b) the same digits photo-style: dark on light, 3-10x larger, off-centre, as PNG, JPEG, RGBA,
  (c) digits 0-9 rendered from every TrueType font on this machine, dark on light.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digit_recognizer.client.client import DigitClient

from pictures import KINDS, load_test_digits, photo_style, save


def classify(paths: list[Path], target: str) -> dict[str, int]:
    cli = Path(sys.executable).parent / "digit-client"
    output = subprocess.run(
        [str(cli), "classify", "--json", "--target", target, "--timeout", "60", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    answers = {}
    for line in output.stdout.splitlines():
        record = json.loads(line)
        answers[record["path"]] = record["digit"]
    if output.returncode:
        print(output.stderr, file=sys.stderr)
    return answers


def accuracy(paths: list[Path], labels: list[int], target: str) -> float:
    answers = classify(paths, target)
    return float(
        np.mean([answers.get(str(p), -1) == y for p, y in zip(paths, labels, strict=True)])
    )


def font_digits(directory: Path) -> tuple[list[Path], list[int]]:
    fonts = sorted(Path("/usr/share/fonts").rglob("*.ttf"))
    paths, labels = [], []
    for font_path in fonts:
        font = ImageFont.truetype(str(font_path), 160)
        for digit in range(10):
            canvas = Image.new("L", (260, 260), 245)
            ImageDraw.Draw(canvas).text((60, 20), str(digit), font=font, fill=20)
            path = directory / f"font-{font_path.stem}-{digit}.png"
            canvas.save(path)
            paths.append(path)
            labels.append(digit)
    return paths, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--mnist", type=Path, default=Path("../shared/mnist"))
    args = parser.parse_args()
    digits, labels = load_test_digits(args.mnist, args.count)
    with DigitClient(args.target, timeout=60) as client:
        raw = client.classify_many(digits)
    raw_accuracy = float(np.mean([p.digit for p in raw] == labels))
    print(f"model, raw MNIST pixels:          {raw_accuracy:.4f} ({args.count} digits)")
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        mnist_paths = [
            save(Image.fromarray(d), root / f"mnist-{i}", "png") for i, d in enumerate(digits)
        ]
        mnist_accuracy = accuracy(mnist_paths, list(labels), args.target)
        print(f"(a) MNIST PNG files:              {mnist_accuracy:.4f}")
        for kind in KINDS:
            paths = [
                save(photo_style(d, rng, kind), root / f"{kind}-{i}", kind)
                for i, d in enumerate(digits)
            ]
            print(
                f"(b) photo-style {kind:5}:            "
                f"{accuracy(paths, list(labels), args.target):.4f}"
            )
        paths, font_labels = font_digits(root)
        print(
            f"(c) font digits ({len(paths)} pictures): "
            f"{accuracy(paths, font_labels, args.target):.4f}"
        )


if __name__ == "__main__":
    main()
