"""Pictures as people take them, made up: digits and things that are not digits, and numbers.

Everything is drawn as a photo or scan would show it (dark ink on light paper, larger than
28x28, off-centre, a little blur and noise) and then goes through the client's own recipe
(`client.images.to_mnist`), so the not-a-digit detector learns from exactly what the served
model is shown. Nothing is downloaded: the fonts are the ones matplotlib (a `[train]` dependency)
ships inside its package, Pillow's built-in one and the Hershey stroke faces of the
hershey-fonts package (single-line glyphs: drawn with a pen of any width they look written, not
printed), never the machine's own, so every machine and the trainer image draw the same
pictures and train the same model; the rest is MNIST and drawing.

Typed letters that look like digits in most fonts are never used as non-digits (O o Q D are
0s, I l i j | ! ( ) [ ] / and backslash are 1s, Z z 2s, S s $ 5s, B 8, b G 6s, g q 9s): a
service that rejected a typed "0" for looking like an "O" would be wrong, not careful. The
brackets and slashes joined the list when a detector accepted them as often as it kept real
1s: framed as MNIST frames a digit, one slanted or bowed stroke is what a written 1 is.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.metadata
import multiprocessing
import os
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from digit_recognizer.client.errors import ImageError
from digit_recognizer.client.images import to_mnist
from digit_recognizer.protos.contract import PIXELS_PER_IMAGE

# Bundled with matplotlib but not text faces: a fallback that draws every character as a box,
# and Computer Modern's math extension and symbol faces (their ASCII code points hold symbols).
NOT_TEXT_FONTS = ("LastResort", "cmex10", "cmsy10")
LOOK_ALIKES = set("OoQDIlij|!()[]/\\ZzSs$BbGgq")
NON_DIGIT_GLYPHS = "".join(
    c for c in string.ascii_letters + "#$%&@*+?<>=~^/\\{}[]()" if c not in LOOK_ALIKES
)
# The Hershey faces with Latin letters and digits (its gothic, Greek, Cyrillic and symbol
# faces are left out: their glyphs at ASCII code points are other alphabets or symbols).
STROKE_FACES = ("futural", "futuram", "cursive", "scriptc", "scripts", "rowmand", "rowmans",
                "rowmant", "timesi", "timesib", "timesr", "timesrb")  # fmt: skip
Rng = np.random.Generator


@dataclass(frozen=True)
class StrokeFace:
    """A Hershey stroke face: glyphs as pen paths, drawn with a pen width of our choosing."""

    face: str

    @property
    def name(self) -> str:
        return f"hershey-{self.face}"


Font = Path | StrokeFace | None  # None: Pillow's built-in font


def package_fonts() -> list[Path | StrokeFace]:
    """The TrueType faces bundled in matplotlib's package that draw every Latin letter and
    digit, and the Hershey stroke faces: the same wherever the same `[train]` install is."""
    import matplotlib
    from fontTools.ttLib import TTFont  # matplotlib's own dependency

    needed = {ord(c) for c in string.ascii_letters + string.digits}
    usable = []
    for path in sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf")):
        if path.stem.startswith(NOT_TEXT_FONTS):
            continue
        with TTFont(path, lazy=True) as face:
            if needed <= set(face["cmap"].getBestCmap()):
                usable.append(path)
    return [*usable, *(StrokeFace(face) for face in STROKE_FACES)]


def font_names(fonts: list[Font]) -> list[str]:
    """How the model card and the trainer's log name the fonts drawn with."""
    return [font.name if font is not None else "pillow-default" for font in fonts]


def split_fonts(fonts: list[Path | StrokeFace]) -> tuple[list[Font], list[Font]]:
    """(training fonts, held-out fonts): a stable quarter of the font files and of the stroke
    faces is held out, so the figures on typed pictures are for faces the models never saw."""

    def digest(font: Path | StrokeFace) -> bytes:
        return hashlib.sha256(font.name.encode()).digest()

    outlines: list[Path | StrokeFace] = [f for f in fonts if not isinstance(f, StrokeFace)]
    held: list[Path | StrokeFace] = [f for f in outlines if digest(f)[0] % 4 == 0]
    if not held and len(outlines) > 1:
        held = outlines[-1:]
    strokes = sorted((f for f in fonts if isinstance(f, StrokeFace)), key=digest)
    held += strokes[: len(strokes) // 4]
    training: list[Font] = [f for f in fonts if f not in held]
    return [None, *training], list(held) or [None]


def _font(font: Font, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if font is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(font), size)


def _paper(width: int, height: int, rng: Rng) -> Image.Image:
    shade = int(rng.integers(200, 256))
    return Image.new("L", (width, height), shade)


def _finish(picture: Image.Image, rng: Rng) -> Image.Image:
    """Camera and scanner: a little blur, noise, uneven light."""
    if rng.random() < 0.6:
        picture = picture.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    pixels = np.asarray(picture, np.float32)
    light = np.linspace(rng.uniform(-20, 0), rng.uniform(0, 20), pixels.shape[1])[None, :]
    noisy = pixels + light + rng.normal(0, rng.uniform(1, 8), pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@functools.cache
def _stroke_face(face: str) -> Any:
    """A loaded Hershey face (loading decompresses the package's font data: ~10 ms)."""
    from HersheyFonts import HersheyFonts

    fonts = HersheyFonts()
    fonts.load_default_font(face)
    fonts.normalize_rendering(100)
    return fonts


@functools.cache
def _strokes_of(face: str, text: str) -> np.ndarray:
    """The pen paths of `text` in a Hershey face: (segments, 2 ends, x/y), y pointing up."""
    lines = list(_stroke_face(face).lines_for_text(text))
    return np.array(lines, np.float32).reshape(-1, 2, 2)


def _written(text: str, face: StrokeFace, size: int, rng: Rng) -> Image.Image:
    """`text` drawn along a stroke face's paths with a round pen, `size` px tall or so."""
    segments = _strokes_of(face.face, text) * (size / 100)
    segments[..., 1] *= -1  # image rows grow downwards
    pen = max(2, round(size * float(rng.uniform(0.05, 0.16))))
    margin = int(rng.integers(size // 4, size)) + pen
    low = segments.reshape(-1, 2).min(axis=0)
    extent = segments.reshape(-1, 2).max(axis=0) - low
    canvas = _paper(int(extent[0]) + 2 * margin, int(extent[1]) + 2 * margin, rng)
    draw, ink, r = ImageDraw.Draw(canvas), int(rng.integers(0, 90)), pen / 2
    for start, end in segments - low + margin:
        draw.line([tuple(start), tuple(end)], fill=ink, width=pen)
        for x, y in (start, end):  # round joints: no notches where segments meet
            draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    return canvas


def _printed(text: str, font: Path | None, size: int, rng: Rng) -> Image.Image:
    """`text` in an outline font, `size` px, now and then with a heavier pen."""
    face = _font(font, size)
    left, top, right, bottom = (int(edge) for edge in face.getbbox(text))
    margin = int(rng.integers(size // 4, size))
    canvas = _paper(right - left + 2 * margin, bottom - top + 2 * margin, rng)
    ink = int(rng.integers(0, 90))
    ImageDraw.Draw(canvas).text((margin - left, margin - top), text, fill=ink, font=face)
    if rng.random() < 0.3:  # a heavier pen
        canvas = canvas.filter(ImageFilter.MinFilter(3))
    return canvas


def typed(text: str, font: Font, rng: Rng, sizes: tuple[int, int] = (40, 110)) -> Image.Image:
    """`text` printed in `font` (or written along a stroke face) at a random size in `sizes`
    (pixels), weight and slant."""
    size = int(rng.integers(*sizes))
    if isinstance(font, StrokeFace):
        canvas = _written(text, font, size, rng)
    else:
        canvas = _printed(text, font, size, rng)
    angle = float(rng.uniform(-8, 8))
    canvas = canvas.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)
    return _finish(canvas, rng)


def photo_of(image: np.ndarray, rng: Rng) -> Image.Image:
    """A 28x28 (or 28xW) MNIST-style array (light ink on black) as a photo of ink on paper."""
    scale = float(rng.uniform(3, 7))
    height, width = image.shape
    ink = Image.fromarray(255 - image.astype(np.uint8)).resize(
        (round(width * scale), round(height * scale)), Image.Resampling.BICUBIC
    )
    margin = int(rng.integers(5, 40))
    paper = _paper(ink.width + 2 * margin, ink.height + 2 * margin, rng)
    dark = np.asarray(ink, np.float32) / 255.0
    region = np.asarray(paper, np.float32)[
        margin : margin + ink.height, margin : margin + ink.width
    ]
    blended = region * dark + float(rng.integers(0, 80)) * (1 - dark)
    paper.paste(Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)), (margin, margin))
    return _finish(paper, rng)


def scribble(rng: Rng) -> Image.Image:
    """Strokes that are not a digit: tangles, zigzags, spirals, hatching, blobs, shapes,
    polygons through random points, nested outlines, smooth curves."""
    side = int(rng.integers(120, 260))
    canvas = _paper(side, side, rng)
    draw = ImageDraw.Draw(canvas)
    ink = int(rng.integers(0, 90))
    width = int(rng.integers(3, 14))
    kind = rng.integers(0, 9)
    low, high = side * 0.15, side * 0.85
    if kind == 0:  # a tangle of random strokes
        for _ in range(rng.integers(2, 6)):
            points = [tuple(p) for p in rng.uniform(low, high, (int(rng.integers(3, 9)), 2))]
            draw.line(points, fill=ink, width=width, joint="curve")
    elif kind == 1:  # zigzag
        count = int(rng.integers(5, 12))
        xs = np.linspace(low, high, count)
        ys = np.where(np.arange(count) % 2, low, high) + rng.normal(0, side * 0.05, count)
        draw.line(list(zip(xs, ys, strict=True)), fill=ink, width=width)
    elif kind == 2:  # spiral
        turns = rng.uniform(2, 4)
        t = np.linspace(0, turns * 2 * np.pi, 200)
        r = (side * 0.35) * t / t[-1]
        points = list(zip(side / 2 + r * np.cos(t), side / 2 + r * np.sin(t), strict=True))
        draw.line(points, fill=ink, width=max(2, width // 2))
    elif kind == 3:  # hatching
        for offset in np.linspace(low, high, int(rng.integers(4, 9))):
            draw.line([(low, offset), (high, offset + rng.uniform(-30, 30))], fill=ink, width=width)
    elif kind == 4:  # filled blobs
        for _ in range(rng.integers(1, 4)):
            x, y = rng.uniform(low, high, 2)
            r = rng.uniform(side * 0.08, side * 0.3)
            draw.ellipse([x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r], fill=ink)
    elif kind == 6:  # a closed polygon through points around a centre, in a random order
        count = int(rng.integers(4, 10))
        angles = rng.uniform(0, 2 * np.pi, count)
        radii = side * rng.uniform(0.15, 0.38, count)
        order = rng.permutation(count) if rng.random() < 0.5 else np.argsort(angles)
        points = [(side / 2 + radii[i] * np.cos(angles[i]), side / 2 + radii[i] * np.sin(angles[i]))
                  for i in [*order, order[0]]]  # fmt: skip
        draw.line(points, fill=ink, width=width, joint="curve")
    elif kind == 7:  # outlines inside outlines: ellipses, boxes, a mix
        c, outer = side / 2, side * rng.uniform(0.3, 0.42)
        for r in np.linspace(outer, outer * rng.uniform(0.2, 0.5), int(rng.integers(2, 4))):
            squash = rng.uniform(0.6, 1.0)
            box = [c - r, c - r * squash, c + r, c + r * squash]
            if rng.random() < 0.6:
                draw.ellipse(box, outline=ink, width=width)
            else:
                draw.rectangle(box, outline=ink, width=width)
    elif kind == 8:  # a smooth curve wandering through random points
        anchors = rng.uniform(low, high, (int(rng.integers(4, 8)), 2))
        t = np.linspace(0, 1, len(anchors))
        fine = np.linspace(0, 1, 200)
        xs, ys = np.interp(fine, t, anchors[:, 0]), np.interp(fine, t, anchors[:, 1])
        kernel = np.hanning(41) / np.hanning(41).sum()  # rounds the corners off
        xs = np.convolve(np.pad(xs, 20, "edge"), kernel, "valid")
        ys = np.convolve(np.pad(ys, 20, "edge"), kernel, "valid")
        draw.line(list(zip(xs, ys, strict=True)), fill=ink, width=width, joint="curve")
    else:  # shapes: boxes, triangles, crosses
        for _ in range(rng.integers(1, 3)):
            shape = rng.integers(0, 3)
            a, b = sorted(rng.uniform(low, high, 2))
            if shape == 0:
                draw.rectangle([a, a, b, b], outline=ink, width=width)
            elif shape == 1:
                draw.polygon([(a, b), (b, b), ((a + b) / 2, a)], outline=ink, width=width)
            else:
                draw.line([(a, a), (b, b)], fill=ink, width=width)
                draw.line([(a, b), (b, a)], fill=ink, width=width)
    return _finish(canvas, rng)


def texture(rng: Rng) -> Image.Image:
    """Surfaces rather than marks: noise, smooth blotches, stripes, checks, ruled paper."""
    side = int(rng.integers(100, 260))
    kind = rng.integers(0, 5)
    if kind == 0:  # grain
        pixels = rng.normal(rng.uniform(100, 200), rng.uniform(20, 70), (side, side))
    elif kind == 1:  # blotches: low-frequency noise
        coarse = rng.uniform(0, 255, (int(rng.integers(3, 9)),) * 2).astype(np.float32)
        pixels = np.asarray(
            Image.fromarray(coarse, "F").resize((side, side), Image.Resampling.BICUBIC)
        )
    elif kind == 2:  # stripes at an angle
        y, x = np.mgrid[:side, :side]
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
        pixels = 128 + 110 * np.sign(np.sin((x * np.cos(angle) + y * np.sin(angle)) / period))
    elif kind == 3:  # checks
        cell = int(rng.integers(8, 40))
        y, x = np.mgrid[:side, :side]
        pixels = np.where(((x // cell) + (y // cell)) % 2, 230.0, 40.0)
    else:  # ruled paper, with a margin line now and then
        pixels = np.full((side, side), float(rng.integers(215, 256)))
        gap = int(rng.integers(14, 30))
        pixels[int(rng.integers(3, gap)) :: gap, :] = float(rng.integers(60, 170))
        if rng.random() < 0.4:
            pixels[:, int(rng.integers(10, side // 3))] = float(rng.integers(60, 170))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return _finish(image, rng)


def piece_of(digit: np.ndarray, rng: Rng) -> Image.Image:
    """A part of an MNIST digit: a third to two thirds of it, cut anywhere."""
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    height, width = bottom - top, right - left
    if rng.random() < 0.5:  # a horizontal slice
        keep = min(height, max(3, int(height * rng.uniform(0.3, 0.6))))
        start = top + int(rng.integers(0, height - keep + 1))
        part = digit.copy()
        part[:start], part[start + keep :] = 0, 0
    else:  # a vertical slice
        keep = min(width, max(3, int(width * rng.uniform(0.35, 0.6))))
        start = left + int(rng.integers(0, width - keep + 1))
        part = digit.copy()
        part[:, :start], part[:, start + keep :] = 0, 0
    return photo_of(part, rng)


def pair_of(first: np.ndarray, second: np.ndarray, rng: Rng) -> Image.Image:
    """Two MNIST digits side by side in one picture: one picture, two digits, not a digit."""
    overlap = int(rng.integers(4, 12))
    both = np.zeros((28, 56 - overlap), np.uint8)
    both[:, :28] = first
    both[:, 28 - overlap :] = np.maximum(both[:, 28 - overlap :], second)
    return photo_of(both, rng)


def number_of(digits: list[np.ndarray], rng: Rng) -> Image.Image:
    """MNIST digits written side by side as one number: varying gaps (touching now and
    then) and a wandering baseline."""
    shifts = rng.integers(-3, 4, len(digits))
    # MNIST's 28x28 frames hold about 4 px of margin each side: -8 makes the boxes touch.
    gaps = [int(rng.choice([-8, -6, -4, -2, 0, 2, 4, 8], p=GAP_ODDS)) for _ in digits[1:]]
    width = 28 * len(digits) + sum(gaps)
    canvas = np.zeros((40, max(28, width)), np.uint8)
    x = 0
    for i, digit in enumerate(digits):
        y = 6 + int(shifts[i])
        region = canvas[y : y + 28, x : x + 28]
        canvas[y : y + 28, x : x + 28] = np.maximum(region, digit[:, : region.shape[1]])
        if i < len(gaps):
            x += 28 + gaps[i]
    return photo_of(canvas, rng)


GAP_ODDS = (0.05, 0.1, 0.15, 0.15, 0.2, 0.15, 0.1, 0.1)


@dataclass(frozen=True)
class PictureSet:
    """One kind of picture, in the model's input form."""

    name: str
    is_digit: bool
    pixels: np.ndarray  # (N, 784) float32
    unreadable: int  # pictures the client itself refuses (blank: "no digit found")


def as_inputs(name: str, is_digit: bool, pictures: Iterator[Image.Image]) -> PictureSet:
    rows, unreadable = [], 0
    for picture in pictures:
        try:
            rows.append(to_mnist(picture))
        except ImageError:
            unreadable += 1
    pixels = (
        np.stack(rows).astype(np.float32) if rows else np.zeros((0, PIXELS_PER_IMAGE), np.float32)
    )
    return PictureSet(name, is_digit, pixels, unreadable)


_WORKER_STATE: dict[str, object] = {}  # each drawing process's digits and fonts, sent once


def _worker_init(digits: np.ndarray, fonts: list[Font]) -> None:
    _WORKER_STATE.update(digits=digits, fonts=fonts)


def _draw_chunk(kind: str, count: int, seed: int) -> PictureSet:
    """`count` pictures of one kind, in a worker process set up by _worker_init."""
    digits = _WORKER_STATE["digits"]
    fonts = _WORKER_STATE["fonts"]
    assert isinstance(digits, np.ndarray) and isinstance(fonts, list)
    return _draw_set(kind, count, digits, fonts, seed)


# The classifier's typed digits are drawn smaller than the detector's pictures: the client's
# recipe scales every digit to 20x20 anyway, and a 24-64 px digit costs 3.6 ms to draw and
# frame against 5.9 ms at 40-110 px (6,000 of them: the first run's longest wait).
TYPED_DIGIT_SIZES = (24, 64)


def _typed_digits_chunk(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` typed digits in the worker's fonts, with their labels, for the classifier."""
    fonts = _WORKER_STATE["fonts"]
    assert isinstance(fonts, list)
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    labels: list[int] = []
    while len(rows) < count:
        label = int(rng.integers(10))
        try:
            font = fonts[rng.integers(len(fonts))]
            rows.append(to_mnist(typed(str(label), font, rng, TYPED_DIGIT_SIZES)))
        except ImageError:
            continue
        labels.append(label)
    return np.stack(rows).astype(np.float32), np.array(labels, np.uint8)


def _draw_set(
    kind: str, count: int, digits: np.ndarray, fonts: list[Font], seed: int
) -> PictureSet:
    """One kind of picture, `count` of them."""
    rng = np.random.default_rng(seed)

    def digit_image() -> np.ndarray:
        return digits[rng.integers(len(digits))]

    def typed_from(glyphs: str) -> Callable[[Rng], Image.Image]:
        return lambda r: typed(glyphs[r.integers(len(glyphs))], fonts[r.integers(len(fonts))], r)

    draw: dict[str, tuple[bool, Callable[[Rng], Image.Image]]] = {
        "photos of digits": (True, lambda r: photo_of(digit_image(), r)),
        "low-resolution digits": (True, lambda r: low_resolution(digit_image(), r)),
        "typed digits": (True, typed_from(string.digits)),
        "typed letters and symbols": (False, typed_from(NON_DIGIT_GLYPHS)),
        "scribbles": (False, scribble),
        "textures and ruled paper": (False, texture),
        "pieces of digits": (False, lambda r: piece_of(digit_image(), r)),
        "pairs of digits": (False, lambda r: pair_of(digit_image(), digit_image(), r)),
    }
    if kind == "digits read from numbers":
        return _read_pieces(kind, count, digits, rng)
    if kind == "pieces read from textures and scribbles":
        return _pieces_of_non_numbers(kind, count, rng)
    is_digit, make = draw[kind]
    return as_inputs(kind, is_digit, (make(rng) for _ in range(count)))


def low_resolution(digit: np.ndarray, rng: Rng) -> Image.Image:
    """A digit from a coarse source (a small scan, an 8x8 thumbnail) blown up again."""
    side = int(rng.integers(7, 13))
    coarse = Image.fromarray(digit).resize((side, side), Image.Resampling.BOX)
    return photo_of(np.asarray(coarse.resize((28, 28), Image.Resampling.BICUBIC)), rng)


def _read_pieces(kind: str, count: int, digits: np.ndarray, rng: Rng) -> PictureSet:
    """Digits as the number reader cuts them out of written numbers: neighbours' stroke ends,
    cut edges and all. Only numbers cut into the right count of pieces are used."""
    from digit_recognizer.client.reading import find_digits

    rows: list[np.ndarray] = []
    while len(rows) < count:
        chosen = [digits[rng.integers(len(digits))] for _ in range(int(rng.integers(2, 5)))]
        pieces = find_digits(number_of(chosen, rng))
        if len(pieces) == len(chosen):
            rows.extend(p.pixels for p in pieces)
    return PictureSet(kind, True, np.stack(rows[:count]).astype(np.float32), 0)


def _pieces_of_non_numbers(kind: str, count: int, rng: Rng) -> PictureSet:
    """What the number reader cuts out of a texture or a scribble (a blob of gravel, a bit of
    a stripe, a loop): not digits. Without them the head had only seen whole textures, and a
    reader asking about each piece read gravel as "3181111"."""
    from digit_recognizer.client.reading import find_digits

    rows: list[np.ndarray] = []
    while len(rows) < count:
        picture = texture(rng) if rng.random() < 0.6 else scribble(rng)
        try:
            pieces = find_digits(picture)
        except ImageError:  # too many pieces: the reader refuses it before any piece is read
            continue
        for i in rng.permutation(len(pieces))[:3]:
            rows.append(pieces[i].pixels)
    return PictureSet(kind, False, np.stack(rows[:count]).astype(np.float32), 0)


# (kind, share of `count`). Letters and symbols three times over: ~70 glyphs in ~25 faces
# are the most varied kind, and the head learned them last (held-out faces: 77% rejected with
# 1,000, 86% with 3,000; mean of six heads on the same classifier, digits kept unchanged).
KINDS = (
    ("photos of digits", 1.0),
    ("low-resolution digits", 1.0),
    ("digits read from numbers", 1.0),
    ("typed digits", 1.0),
    ("typed letters and symbols", 3.0),
    ("scribbles", 1.0),
    ("textures and ruled paper", 0.5),
    ("pieces of digits", 0.5),
    ("pairs of digits", 0.5),
    ("pieces read from textures and scribbles", 0.5),
)


CHUNK = 100  # pictures per job: ~0.5 s each, so progress shows and both cores stay busy
CACHE_FORMAT = 1  # bump when the cache file's layout changes


def default_count(train_images: int) -> int:
    """Pictures of each kind when --detector-pictures is not given: they scale with the
    training images asked for (60,000 -> 1,000; a 2,000-image run draws 100), so a quick
    run stays quick."""
    return int(np.clip(train_images // 60, 100, 1000))


def _subset(digits: np.ndarray, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).choice(len(digits), min(len(digits), 6000), replace=False)
    return digits[order]


def cache_key(subset: np.ndarray, fonts: list[Font], seed: int, count: int, typed: int = 0) -> str:
    """Everything the drawn pictures depend on: the drawing and reading code (this module,
    the client's recipe and reader), the libraries that draw, the digits, the font files'
    bytes, the seed and the count. Any change gives a new key, so a cache never serves a
    stale set."""
    from digit_recognizer.client import images, reading

    digest = hashlib.sha256(f"pictures cache {CACHE_FORMAT}".encode())
    for module in (__name__, images.__name__, reading.__name__):
        source = sys.modules[module].__file__
        digest.update(Path(str(source)).read_bytes())
    for package in ("numpy", "pillow", "scipy", "hershey-fonts"):
        digest.update(f"{package} {importlib.metadata.version(package)}".encode())
    digest.update(np.ascontiguousarray(subset).tobytes())
    for font in fonts:
        if isinstance(font, StrokeFace):  # its glyphs are in the package hashed above
            digest.update(font.name.encode())
        else:
            digest.update(font.read_bytes() if font is not None else b"pillow-default")
    digest.update(f"{KINDS} {CHUNK} {seed} {count} {typed}".encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "digit-recognizer"


Cached = tuple[list[PictureSet], tuple[np.ndarray, np.ndarray]]


def _load_cached(path: Path) -> Cached | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            names = [str(n) for n in stored["names"]]
            typed = (stored["typed_pixels"], stored["typed_labels"])
            return [
                PictureSet(name, bool(stored["is_digit"][i]), stored[f"pixels_{i}"],
                           int(stored["unreadable"][i]))
                for i, name in enumerate(names)
            ], typed  # fmt: skip
    except (OSError, KeyError, ValueError):
        return None  # missing or damaged: draw afresh


def _store(path: Path, sets: list[PictureSet], typed: tuple[np.ndarray, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # Any: numpy's stub would otherwise take a key of this dict for `allow_pickle`.
        pixels: dict[str, Any] = {f"pixels_{i}": s.pixels for i, s in enumerate(sets)}
        with os.fdopen(fd, "wb") as out:
            np.savez(
                out,
                names=np.array([s.name for s in sets]),
                is_digit=np.array([s.is_digit for s in sets]),
                unreadable=np.array([s.unreadable for s in sets]),
                typed_pixels=typed[0],
                typed_labels=typed[1],
                **pixels,
            )
        os.replace(temp, path)  # readers see a whole file or none
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class Drawing:
    """The detector's pictures being drawn in worker processes: started early (they need
    only MNIST and the fonts, not the classifier), so the drawing overlaps the classifier's
    training; `collect` waits for them, logging progress at least every few seconds."""

    def __init__(
        self,
        digits: np.ndarray,
        fonts: list[Font],
        seed: int,
        count: int,
        workers: int | None = None,
        cache_dir: Path | None = None,
        typed: int = 0,
    ) -> None:
        self.count, self.fonts, self.typed = count, fonts, typed
        subset = _subset(digits, seed)
        self.cache = (
            cache_dir / f"pictures-{cache_key(subset, fonts, seed, count, typed)}.npz"
            if cache_dir is not None
            else None
        )
        self.cached = _load_cached(self.cache) if self.cache is not None else None
        self.jobs: list[tuple[int, concurrent.futures.Future[PictureSet]]] = []
        self.typed_jobs: list[concurrent.futures.Future[tuple[np.ndarray, np.ndarray]]] = []
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._typed: tuple[np.ndarray, np.ndarray] | None = None
        if self.cached is not None:
            self._typed = self.cached[1]
            return
        context = multiprocessing.get_context("spawn")  # TensorFlow's threads do not survive fork
        self.pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_init, initargs=(subset, fonts)
        )
        # The classifier's typed digits first: the classifier waits for them.
        for chunk, first in enumerate(range(0, typed, CHUNK)):
            chunk_seed = int(np.random.SeedSequence([seed, 1000, chunk]).generate_state(1)[0])
            size = min(CHUNK, typed - first)
            self.typed_jobs.append(self.pool.submit(_typed_digits_chunk, size, chunk_seed))
        for i, (kind, share) in enumerate(KINDS if count else ()):
            wanted = max(1, int(count * share))
            for chunk, first in enumerate(range(0, wanted, CHUNK)):
                chunk_seed = int(np.random.SeedSequence([seed, i, chunk]).generate_state(1)[0])
                size = min(CHUNK, wanted - first)
                self.jobs.append((i, self.pool.submit(_draw_chunk, kind, size, chunk_seed)))

    def typed_digits(self) -> tuple[np.ndarray, np.ndarray]:
        """The classifier's typed digits: (N, 784) float32 pixels and their uint8 labels."""
        if self._typed is None:
            parts = [future.result() for future in self.typed_jobs]
            self._typed = (
                np.concatenate([p[0] for p in parts])
                if parts
                else np.zeros((0, PIXELS_PER_IMAGE), np.float32),
                np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint8),
            )
        return self._typed

    def collect(self, log: Callable[[str], None] = lambda _line: None) -> list[PictureSet]:
        if self.cached is not None:
            log(f"detector: pictures from the cache, {self.cache}")
            return self.cached[0]
        typed = self.typed_digits()
        started, futures = time.perf_counter(), [future for _, future in self.jobs]
        total = len(futures)
        try:
            while True:
                done, waiting = concurrent.futures.wait(futures, timeout=5)
                log(
                    f"detector: drawn {len(done)}/{total} batches of pictures "
                    f"({time.perf_counter() - started:.0f} s)"
                )
                if not waiting:
                    break
            parts: dict[int, list[PictureSet]] = {}
            for i, future in self.jobs:
                parts.setdefault(i, []).append(future.result())
        finally:
            self.close()
        sets = [
            PictureSet(
                chunks[0].name,
                chunks[0].is_digit,
                np.concatenate([c.pixels for c in chunks]),
                sum(c.unreadable for c in chunks),
            )
            for _, chunks in sorted(parts.items())
        ]
        if self.cache is not None:
            try:
                _store(self.cache, sets, typed)
            except OSError as exc:  # a read-only home is no reason to fail the training
                log(f"detector: pictures not cached ({exc})")
        return sets

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def start_drawing(
    digits: np.ndarray, seed: int, count: int, log: Callable[[str], None], typed: int = 0
) -> Drawing:
    """Start drawing, with the training fonts, `typed` labelled typed digits for the
    classifier and `count` pictures of each kind for the detector (or find them in the
    cache); they need only MNIST and the fonts, so this runs while TensorFlow imports and
    the classifier trains."""
    fonts, _ = split_fonts(package_fonts())
    log(
        f"pictures: drawing {typed} typed digits for the classifier and {count} pictures of "
        f"each kind for the detector with {len(fonts)} fonts: " + ", ".join(font_names(fonts))
    )
    return Drawing(digits, fonts, seed, count, cache_dir=default_cache_dir(), typed=typed)


def detector_sets(
    digits: np.ndarray,
    fonts: list[Font],
    seed: int,
    count: int,
    workers: int | None = None,
    cache_dir: Path | None = None,
) -> list[PictureSet]:
    """Every kind in KINDS (digits: photos of MNIST digits, low-resolution digits, digits cut
    out of numbers, typed digits; non-digits: typed letters and symbols, scribbles, textures,
    pieces and pairs of digits), `count` times its share, drawn from `digits` (uint8
    (N, 28, 28)) and `fonts` in parallel processes, in chunks with seeds of their own."""
    return Drawing(digits, fonts, seed, count, workers, cache_dir).collect()
