"""The one place that turns a picture into the model's input: 784 floats, MNIST-style.

Real pictures are not MNIST: dark ink on light paper, large, off-centre, RGB, RGBA with a
transparent background, JPEG noise, thin pen strokes. MNIST digits are light ink on a black
background, the ink's bounding box fitted into 20x20 keeping its aspect ratio, then placed in
a 28x28 frame so that the centre of mass sits at the centre. `to_mnist` does exactly that; a
picture that already is a 28x28 MNIST-style digit passes through untouched.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from digit_recognizer.client.errors import BlankPicture, ImageError
from digit_recognizer.protos.contract import IMAGE_SIDE

SIDE = IMAGE_SIDE
BOX = 20  # MNIST fits the ink's bounding box into 20x20
MAX_PIXELS = 40_000_000  # refuse decompression bombs long before Pillow's own 178M limit
# Pictures are shrunk to at most this many pixels a side before any float array exists: the
# digit ends up 20 pixels tall, and a float copy of a 40-megapixel picture is 160 MB.
MAX_WORK_SIDE = 2048
_WORK_SIDE = 4 * BOX  # intermediate size where stroke width is measured and corrected
_MNIST_STROKE_PX = 2.2  # typical MNIST stroke width inside the 20-pixel box
_INK_THRESHOLD = 0.25  # after contrast normalisation, fainter pixels are background
# The digit's box is where the ink is at least this share of its strongest: faint specks
# (JPEG noise on a large typed digit, what is left of a shadow's edge) spread it and shrink
# the digit inside. Chosen on the trainer's own pictures (typed digits in its fonts: 98.0%
# read right with any ink > 0 counted, 99.8% with this share).
_BOX_INK = 0.35
# A border darker than this is a dark board (light ink); paper lighter than _LIT_PAPER on a
# quarter of the border is a page (dark ink) whatever shadow lies on the rest.
_DARK_BOARD = 0.4
_LIT_PAPER = 0.75
# Ink is at least this much darker than the paper around it (a share of the paper's light):
# fainter is left-over light or a blank page.
_MIN_CONTRAST = 0.2
# The paper's light is estimated over windows of this share of the picture's shorter side:
# wider than a pen stroke of any digit the picture holds.
_PAPER_WINDOW = 0.3
# Paper darker than this (deep shadow, or the dark side of light ink on black) is taken as
# this dark: dividing by less would blow its noise up into ink.
_DARKEST_PAPER = 0.3
# The light is estimated on a copy of at most this many pixels: 256 x 256 cost 5.8 ms per
# typed-digit picture against 3.7 (1.7 before any estimate), and 64 x 64 blurred a hard
# shadow's edge into ink on a blank page.
_PAPER_PIXELS = 128 * 128

ImageSource = str | os.PathLike[str] | bytes | BinaryIO | Image.Image


def load_image(
    source: ImageSource, name: str | None = None, max_decoded_bytes: int | None = None
) -> Image.Image:
    """Open anything Pillow reads, fully decoded, EXIF orientation applied. A JPEG is decoded
    at a reduced scale (and in grey) when it is larger than the work size: same answer, a
    fraction of the memory. Refused: over MAX_PIXELS, or (when given) pictures whose decoded
    form would take more than `max_decoded_bytes`."""
    label = name or _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                handle = io.BytesIO(source) if isinstance(source, bytes) else source
                image = Image.open(handle)
                if image.format == "JPEG":
                    image.draft("L", (MAX_WORK_SIDE, MAX_WORK_SIDE))
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"{label}: image is {width}x{height} = {width * height:,} pixels, over "
                        f"the {MAX_PIXELS:,} limit (decompression-bomb protection)"
                    )
                decoded = width * height * _bytes_per_pixel(image.mode)
                if max_decoded_bytes is not None and decoded > max_decoded_bytes:
                    raise ImageError(
                        f"{label}: a {width}x{height} {image.mode} picture is {decoded >> 20} MB "
                        f"decoded, over the {max_decoded_bytes >> 20} MB limit; send it smaller "
                        "(or as a JPEG, which is decoded at a reduced scale)"
                    )
                image.load()
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError(f"{label}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{label}: is a directory") from None
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not an image Pillow can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{label}: refused as a decompression bomb ({exc})") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"{label}: cannot decode image ({exc})") from None
    # A broken EXIF block must not lose an otherwise good picture. In place for pictures we
    # opened (a copy doubles the memory); a caller's own Image is left as it was.
    with contextlib.suppress(Exception):
        if isinstance(source, Image.Image):
            return ImageOps.exif_transpose(image)
        ImageOps.exif_transpose(image, in_place=True)
    return image


def to_mnist(
    source: ImageSource, name: str | None = None, max_decoded_bytes: int | None = None
) -> np.ndarray:
    """Any picture of one digit -> float32 (784,) in [0, 1], 0 = background, 1 = ink."""
    label = name or _describe(source)
    image = _shrunk(load_image(source, label, max_decoded_bytes))
    gray = _to_gray(image)
    if not _is_mnist_style(gray):
        gray = _frame(_normalise(gray, label), label)
    return np.clip(np.nan_to_num(gray.reshape(SIDE * SIDE)), 0.0, 1.0).astype(np.float32)


def quantized(pixels: np.ndarray) -> np.ndarray:
    """Model-form pixels in [0, 1] as uint8 0-255: what a picture held, at a quarter of the
    bytes of float32 on the wire (the rounding, at most 1/510, is below what it resolves)."""
    return np.rint(np.asarray(pixels) * 255).astype(np.uint8)


def to_ink(
    source: ImageSource, name: str | None = None, max_decoded_bytes: int | None = None
) -> tuple[np.ndarray, float]:
    """A picture -> (light ink on a zero background in [0, 1] at the work size, the picture's
    pixels per ink pixel): what `frame` and the number reader start from. ImageError when
    the picture is blank."""
    label = name or _describe(source)
    picture = load_image(source, label, max_decoded_bytes)
    image = _shrunk(picture)
    return _normalise(_to_gray(image), label), picture.width / image.width


def frame(ink: np.ndarray, name: str = "<ink>") -> np.ndarray:
    """Ink (light on zero, any size) -> float32 (784,): MNIST's box fit and centring."""
    return np.clip(_frame(ink.astype(np.float32), name).reshape(SIDE * SIDE), 0.0, 1.0)


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow stores per pixel: one byte for grey and palettes, two for 16-bit, else
    four (RGB is kept as RGBX)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _shrunk(image: Image.Image) -> Image.Image:
    """At most MAX_WORK_SIDE a side, in a mode `reduce` handles, never widened to RGBA."""
    if image.mode == "P":
        image = image.convert("LA" if "transparency" in image.info else "L")
    elif image.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    factor = -(-max(image.size) // MAX_WORK_SIDE)  # ceiling division
    if factor == 1:
        return image
    if image.mode not in ("LA", "RGBA"):
        return image.reduce(factor)
    # Pillow reduces alpha modes through a premultiplied copy of the whole picture: go in
    # strips, so that the copy is a strip's.
    width, height = image.size
    reduced = Image.new(image.mode, (-(-width // factor), -(-height // factor)))
    rows = factor * 64
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows))).reduce(factor)
        reduced.paste(strip, (0, top // factor))
    return reduced


def _describe(source: ImageSource) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, Image.Image):
        return "<image>"
    if isinstance(source, bytes):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def _to_gray(image: Image.Image) -> np.ndarray:
    """Luminance in [0, 1]; transparent areas become the background the ink stands out from."""
    if image.mode in ("I", "F"):
        return _unit_range(np.asarray(image, dtype=np.float64))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3]
    luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    opaque = alpha > 0.5
    if opaque.all() or not opaque.any():
        return luminance
    # Ink drawn on a transparent canvas: put it on paper of the opposite shade.
    paper = 1.0 if float(np.median(luminance[opaque])) < 0.5 else 0.0
    return luminance * alpha + paper * (1.0 - alpha)


def _unit_range(values: np.ndarray) -> np.ndarray:
    """Integer or float samples of any range -> [0, 1]: 8- and 16-bit ranges keep their
    meaning (0-255, 0-65535), anything else is stretched from its own minimum to maximum."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        unit = values
    elif low >= 0 and high <= 255:
        unit = values / 255.0
    elif low >= 0 and high <= 65535:
        unit = values / 65535.0
    else:
        unit = (values - low) / (high - low)  # high > low: otherwise low >= 0 and high <= 1
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def _is_mnist_style(gray: np.ndarray) -> bool:
    """Already 28x28 light ink on a black background (MNIST's own PNGs, our --show output)."""
    if gray.shape != (SIDE, SIDE):
        return False
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(np.median(gray)) <= 0.05 and float(border.mean()) <= 0.1 and gray.max() >= 0.5


def _normalise(gray: np.ndarray, label: str) -> np.ndarray:
    """Light ink on a zero background, contrast stretched to [0, 1]. The paper's own
    brightness is estimated at a large scale first and divided out: a shadow, a spotlight
    or a light gradient must not turn into ink where the paper is darker."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    # The border is paper. Light ink on a dark board has a dark border throughout; paper
    # in a shadow is mid-grey, and a page mostly in shadow still shows light paper on a
    # quarter of its border or more (the board's median was the only test: a shadow over
    # half the border made the lit paper the ink).
    middle, upper_quartile = np.percentile(border, [50, 75])
    dark_ink = middle > _DARK_BOARD or upper_quartile > _LIT_PAPER
    paper_side = gray if dark_ink else 1.0 - gray
    paper = np.maximum(_paper_light(paper_side), _DARKEST_PAPER)
    darker = np.clip((paper - paper_side) / paper, 0.0, 1.0)
    background, peak = (float(v) for v in np.percentile(darker, [50, 99.9]))  # one partition
    if peak - background < _MIN_CONTRAST:
        raise BlankPicture(f"{label}: no digit found (blank picture or too little contrast)")
    ink = np.clip((darker - background) / (peak - background), 0.0, 1.0)
    ink = np.clip((ink - _INK_THRESHOLD) / (1.0 - _INK_THRESHOLD), 0.0, 1.0)
    return ink.astype(np.float32)


def _paper_light(gray: np.ndarray) -> np.ndarray:
    """How light the paper is at each pixel (dark ink on light paper): a closing (the
    largest value nearby, then the smallest of those) with a window wider than any pen
    stroke, which keeps the light's own slopes and steps and fills the strokes in. Noise
    would lift a closing of the raw picture by its peaks: where the closing of a smoothed
    copy lies lower (away from steps), it is used. Computed on a copy reduced to at most
    _PAPER_PIXELS (the light changes slowly) and enlarged back."""
    height, width = gray.shape
    factor = max(1, int(np.ceil(np.sqrt(height * width / _PAPER_PIXELS))))
    small = Image.fromarray(gray.astype(np.float32), mode="F")
    if factor > 1:
        small = small.reduce(factor)
    window = 2 * round(_PAPER_WINDOW * min(small.size) / 2) + 1  # odd: centred, edges stay put
    reduced = np.asarray(small)
    light = np.minimum(_closing(reduced, window), _closing(_box_mean(reduced, 5), window))
    if factor == 1:
        return light
    enlarged = Image.fromarray(light, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(enlarged)


def _box_mean(values: np.ndarray, size: int) -> np.ndarray:
    """The mean over a centred `size` x `size` square (edges repeated)."""
    values = values.astype(np.float32, copy=False)
    half = size // 2
    for axis in (0, 1):
        moved = np.moveaxis(values, axis, 0)
        length = moved.shape[0]
        padded = np.concatenate(
            [np.repeat(moved[:1], half, 0), moved, np.repeat(moved[-1:], half, 0)]
        )
        total = padded[:length].copy()
        for offset in range(1, size):
            total += padded[offset : offset + length]
        values = np.moveaxis(total, 0, axis)
    return values / np.float32(size * size)


def _closing(values: np.ndarray, window: int) -> np.ndarray:
    dilated = _running(_running(values, window, 0, np.maximum), window, 1, np.maximum)
    return _running(_running(dilated, window, 0, np.minimum), window, 1, np.minimum)


def _running(values: np.ndarray, window: int, axis: int, pick: np.ufunc) -> np.ndarray:
    """`pick` (np.maximum or np.minimum) over a centred `window` along `axis` (beyond the
    edges: nothing), in log2(window) whole-array steps: each step doubles the span every
    element covers, and two overlapping spans of the largest power of two make the window."""
    values = np.moveaxis(values, axis, 0)
    length = values.shape[0]
    edge = np.inf if pick is np.minimum else -np.inf
    span = np.full((length + window - 1, *values.shape[1:]), edge, np.float32)
    span[window // 2 : window // 2 + length] = values
    width = 1
    while 2 * width <= window:  # span[j]: `pick` over the padded values [j, j + 2 * width)
        span = pick(span[:-width], span[width:])
        width *= 2
    result = pick(span[:length], span[window - width : window - width + length])
    return np.moveaxis(result, 0, axis)


def _bounding_box(ink: np.ndarray) -> tuple[int, int, int, int] | None:
    mask = ink > _BOX_INK * float(ink.max(initial=0.0))
    if max(ink.shape) > 2 * SIDE:
        # Specks of paper texture or JPEG noise must not stretch the box.
        cleaned = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MedianFilter(3))
        mask = np.asarray(cleaned) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _stroke_width(ink: np.ndarray) -> float:
    """Area over half the perimeter: the width of a long stroke."""
    mask = ink > 0.5
    area = float(mask.sum())
    if area == 0:
        return 0.0
    padded = np.pad(mask, 1)
    edges = (
        (padded[1:-1, 1:-1] & ~padded[:-2, 1:-1]).sum()
        + (padded[1:-1, 1:-1] & ~padded[2:, 1:-1]).sum()
        + (padded[1:-1, 1:-1] & ~padded[1:-1, :-2]).sum()
        + (padded[1:-1, 1:-1] & ~padded[1:-1, 2:]).sum()
    )
    return 2.0 * area / max(float(edges) / 2.0, 1.0)


def _resize(ink: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = Image.fromarray(ink, mode="F").resize(
        (max(1, width), max(1, height)), Image.Resampling.LANCZOS
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _frame(ink: np.ndarray, label: str) -> np.ndarray:
    box = _bounding_box(ink)
    if box is None:
        raise BlankPicture(f"{label}: no digit found (no ink after cleaning up noise)")
    top, bottom, left, right = box
    crop = ink[top:bottom, left:right]
    height, width = crop.shape
    # Work at 4x the final size: big enough to measure strokes, small enough to be quick.
    scale = _WORK_SIDE / max(height, width)
    work = _resize(crop, round(width * scale), round(height * scale))
    thinness = _MNIST_STROKE_PX * _WORK_SIDE / BOX - _stroke_width(work)
    if thinness >= 2:  # thin pen strokes would fade to nothing at 20 pixels: thicken them
        size = min(2 * int(thinness // 2) + 1, 9)
        work = np.asarray(Image.fromarray(work, mode="F").filter(ImageFilter.MaxFilter(size)))
    fit = BOX / max(work.shape)
    small = _resize(work, round(work.shape[1] * fit), round(work.shape[0] * fit))
    if small.max() > 0:
        small = small / small.max()
    frame = np.zeros((SIDE, SIDE), np.float32)
    mass = small.sum()
    rows, cols = np.indices(small.shape)
    centre_row = float((rows * small).sum() / mass) if mass else small.shape[0] / 2
    centre_col = float((cols * small).sum() / mass) if mass else small.shape[1] / 2
    top = int(np.clip(round(SIDE / 2 - centre_row), 0, SIDE - small.shape[0]))
    left = int(np.clip(round(SIDE / 2 - centre_col), 0, SIDE - small.shape[1]))
    frame[top : top + small.shape[0], left : left + small.shape[1]] = small
    return frame


_ASCII_SHADES = " .:-=+*#%@"


def render(pixels: np.ndarray, ascii_only: bool = False) -> list[str]:
    """28x28 pixels as 14 lines of half blocks with 24-bit colour escape codes (for --show),
    or, `ascii_only`, as 28 lines of plain characters from light to dark ink."""
    image = np.clip(np.asarray(pixels, np.float32).reshape(SIDE, SIDE) * 255, 0, 255).astype(int)
    if ascii_only:
        shades = len(_ASCII_SHADES) - 1
        return ["".join(_ASCII_SHADES[round(v * shades / 255)] for v in row) for row in image]
    lines = []
    for row in range(0, SIDE, 2):
        cells = []
        for col in range(SIDE):
            upper, lower = image[row, col], image[row + 1, col]
            cells.append(f"\x1b[38;2;{upper};{upper};{upper}m\x1b[48;2;{lower};{lower};{lower}m▀")
        lines.append("".join(cells) + "\x1b[0m")
    return lines


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".pgm",
        ".ppm",
    }
