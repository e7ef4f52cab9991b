"""Finding the digits of a written number in one picture, left to right.

The ink (client.images' recipe: grey, polarity, contrast) is split into connected pieces;
specks are dropped, pieces stacked over each other (a 5's detached bar, a 4 written in two
strokes) are merged, and a piece much wider than the digits around it is cut where the ink is
thinnest into as many digits as its width holds (touching digits). Each piece then becomes an
MNIST-style 28x28 image with the same recipe as a single picture, from its own ink only.

Bounded like every request: at most `max_pieces` pieces (TooManyPieces past it, before any
per-piece work), and the work grows with the picture's pixels, not with the pieces squared: a
picture of specks (a dot every 3 px: 466,000 pieces at 2048x2048) once took minutes, merging
every speck with every column of specks found so far.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from digit_recognizer.client.errors import BlankPicture, ImageError, TooManyPieces
from digit_recognizer.client.images import ImageSource, _describe, frame, quantized, to_ink

if TYPE_CHECKING:
    from digit_recognizer.client.client import Prediction

# scipy labels the ink's connected pieces; it is not in the base install (half its size, for
# three calls), so it is imported only here, when a number is read.
READ_EXTRA_HINT = "pip install 'digit-recognizer[read]'"

# What one Classify takes by default (the server's --max-images-per-request): more pieces
# than this in one picture are not a number but specks, a texture or a long line.
DEFAULT_MAX_PIECES = 1024

# A piece under this share of the tallest piece's height and of the ink is a speck.
_SPECK_HEIGHT = 0.25
_SPECK_INK = 0.01
# Stacked pieces: horizontal overlap over the narrower one's width.
_MERGE_OVERLAP = 0.5
# Fragments: under this share of the typical piece's ink and of its height.
_FRAGMENT_INK = 0.2
_FRAGMENT_HEIGHT = 0.6
# Digits are narrower than tall; wider than this times the typical height is several digits.
_MAX_DIGIT_ASPECT = 1.1
# Touching digits sit about a height apart (their ink is dense where they meet): the
# digits in a wide piece are counted as its width over this share of its height.
_DIGIT_PITCH = 0.9


@dataclass(frozen=True)
class Piece:
    """One digit-sized piece of the picture."""

    box: tuple[int, int, int, int]  # left, top, right, bottom in the picture's own pixels
    pixels: np.ndarray  # (784,) float32, MNIST-style


@dataclass(frozen=True)
class ReadDigit:
    """One piece of a read number: where it is and what the model made of it."""

    box: tuple[int, int, int, int]  # left, top, right, bottom in the picture's pixels
    prediction: Prediction

    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        return {
            "box": list(self.box),
            "digit": p.digit,
            "label": p.label,
            "confidence": round(p.confidence, 6),
            "is_digit": p.looks_like_a_digit,
            **({"digit_score": round(p.digit_score, 6)} if p.digit_score is not None else {}),
        }


@dataclass(frozen=True)
class Reading:
    """A picture read as a number: `text` is the digits left to right; pieces the model says
    are not digits are left out of it and listed in `dropped`."""

    pieces: tuple[ReadDigit, ...]

    @property
    def holds_a_number(self) -> bool:
        """Whether most pieces look like digits. A texture or a scribble cut into pieces,
        where a few happen to pass the detector, is no number: a string of the few weak
        digits (gravel read as "3181111") would be invented, not read."""
        accepted = sum(p.prediction.looks_like_a_digit for p in self.pieces)
        return accepted * 2 > len(self.pieces)

    @property
    def digits(self) -> tuple[ReadDigit, ...]:
        if not self.holds_a_number:
            return ()
        return tuple(p for p in self.pieces if p.prediction.looks_like_a_digit)

    @property
    def dropped(self) -> tuple[ReadDigit, ...]:
        if not self.holds_a_number:
            return self.pieces
        return tuple(p for p in self.pieces if not p.prediction.looks_like_a_digit)

    @property
    def text(self) -> str:
        return "".join(p.prediction.label for p in self.digits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "digits": [p.to_dict() for p in self.digits],
            "dropped": [p.to_dict() for p in self.dropped],
        }


def pixels_u8(pieces: list[Piece]) -> np.ndarray:
    return quantized(np.stack([p.pixels for p in pieces]))


def assemble(pieces: list[Piece], predictions: list[Prediction]) -> Reading:
    return Reading(tuple(ReadDigit(p.box, pr) for p, pr in zip(pieces, predictions, strict=True)))


@dataclass
class _Box:
    left: int
    top: int
    right: int
    bottom: int
    labels: set[int]

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def absorb(self, other: _Box) -> None:
        self.left, self.top = min(self.left, other.left), min(self.top, other.top)
        self.right, self.bottom = max(self.right, other.right), max(self.bottom, other.bottom)
        self.labels |= other.labels


def find_digits(
    source: ImageSource,
    name: str | None = None,
    max_decoded_bytes: int | None = None,
    max_pieces: int = DEFAULT_MAX_PIECES,
) -> list[Piece]:
    """The digit-sized pieces of a picture, left to right; none for a blank picture.
    ImageError when it cannot be read, or when scipy is not installed; TooManyPieces when it
    holds more than `max_pieces` pieces of ink, or wide pieces that would cut into more."""
    ndimage = _ndimage()
    label = name or _describe(source)
    try:
        ink, scale = to_ink(source, label, max_decoded_bytes)
    except BlankPicture:
        return []
    mask = ink > 0
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return []
    boxes, sizes = _pieces_of_ink(labelled, count, label, max_pieces)
    boxes = _merge_stacked(sorted(boxes, key=lambda b: b.left))
    boxes = _absorb_fragments(boxes, sizes)
    height = float(np.median([b.height for b in boxes]))
    digits = sum(_digit_count(b.width, height) for b in boxes)
    if digits > max_pieces:
        raise _too_many(label, f"ink that cuts into {digits:,} digit-sized pieces", max_pieces)
    # Which box each label belongs to (0: a speck, in none): one lookup per pixel of a box.
    owner = np.zeros(count + 1, np.int32)
    for number, box in enumerate(boxes, start=1):
        owner[list(box.labels)] = number
    pieces = []
    for number, box in enumerate(boxes, start=1):
        # The box's own ink only (a neighbour's stroke may reach into it), within the box:
        # masking the whole picture per box would cost a full pass each.
        window = (slice(box.top, box.bottom), slice(box.left, box.right))
        own = np.where(owner[labelled[window]] == number, ink[window], 0.0)
        for left, right in _cuts(own, height):
            crop = own[:, left:right]
            if not crop.any():
                continue
            rows = np.flatnonzero(crop.any(axis=1))
            top, bottom = box.top + int(rows[0]), box.top + int(rows[-1]) + 1
            picture_box = (
                round((box.left + left) * scale),
                round(top * scale),
                round((box.left + right) * scale),
                round(bottom * scale),
            )
            pieces.append(Piece(picture_box, frame(crop[rows[0] : rows[-1] + 1])))
    return pieces


def _too_many(label: str, found: str, limit: int) -> TooManyPieces:
    return TooManyPieces(
        f"{label}: {found}, over the limit of {limit:,} pieces per picture (a number has a few; "
        "this looks like specks, a texture or a long line)",
        limit,
    )


def _pieces_of_ink(
    labelled: np.ndarray, count: int, label: str, max_pieces: int
) -> tuple[list[_Box], np.ndarray]:
    """The labelled pieces that are not specks (TooManyPieces past `max_pieces`), and every
    label's ink in pixels. Computed over arrays, one pass over the ink: a Python object per
    piece would cost seconds for a picture of hundreds of thousands of specks."""
    rows, cols = np.nonzero(labelled)
    index = labelled[rows, cols] - 1
    sizes = np.bincount(index, minlength=count).astype(np.float64)
    top = np.full(count, labelled.shape[0], np.intp)
    np.minimum.at(top, index, rows)
    bottom = np.zeros(count, np.intp)
    np.maximum.at(bottom, index, rows)
    left = np.full(count, labelled.shape[1], np.intp)
    np.minimum.at(left, index, cols)
    right = np.zeros(count, np.intp)
    np.maximum.at(right, index, cols)
    heights = bottom + 1 - top
    tallest, total = int(heights.max()), float(sizes.sum())
    # A speck is short beside the tallest piece and holds little of the ink. When the tallest
    # piece is itself a speck (a picture of dots), every dot passes: the caller's limit on
    # pieces refuses such a picture.
    kept = np.flatnonzero((heights >= _SPECK_HEIGHT * tallest) | (sizes >= _SPECK_INK * total))
    if len(kept) > max_pieces:
        raise _too_many(label, f"{len(kept):,} pieces of ink", max_pieces)
    boxes = [
        _Box(int(left[i]), int(top[i]), int(right[i]) + 1, int(bottom[i]) + 1, {int(i) + 1})
        for i in kept
    ]
    return boxes, sizes


def _ndimage() -> Any:
    try:
        from scipy import ndimage
    except ImportError:
        raise ImageError(f"reading numbers needs scipy: {READ_EXTRA_HINT}") from None
    return ndimage


def _merge_stacked(boxes: list[_Box]) -> list[_Box]:
    """Boxes sorted by their left edge; each joins the first box kept so far that overlaps it
    over half the narrower one's width. Only the kept boxes still reaching past its left
    edge can: the others are set aside (the pieces after it start further right still), so a
    picture of many columns of pieces costs their number, not its square."""
    merged: list[_Box] = []
    reaching: list[_Box] = []  # kept boxes whose right edge is past the current left edge
    for box in boxes:
        reaching = [kept for kept in reaching if kept.right > box.left]
        for kept in reaching:
            overlap = min(kept.right, box.right) - max(kept.left, box.left)
            if overlap >= _MERGE_OVERLAP * min(kept.width, box.width):
                kept.absorb(box)
                break
        else:
            merged.append(box)
            reaching.append(box)
    return merged


def _absorb_fragments(boxes: list[_Box], sizes: np.ndarray) -> list[_Box]:
    """Small, short pieces beside a digit (a stroke the pen was lifted from) join the nearest
    piece instead of counting as digits. A "1" is short of ink but full height: it stays."""
    if len(boxes) < 2:
        return boxes
    ink = [float(sum(sizes[label - 1] for label in b.labels)) for b in boxes]
    typical_ink, typical_height = float(np.median(ink)), float(np.median([b.height for b in boxes]))

    def fragment(box: _Box, amount: float) -> bool:
        return (
            amount < _FRAGMENT_INK * typical_ink and box.height < _FRAGMENT_HEIGHT * typical_height
        )

    kept = [b for b, amount in zip(boxes, ink, strict=True) if not fragment(b, amount)]
    if not kept:
        return boxes
    # The kept boxes' edges as arrays: the nearest one (the first of equals, as min() picks)
    # in one vectorised step per fragment; edges move as fragments join.
    lefts = np.array([k.left for k in kept])
    rights = np.array([k.right for k in kept])
    for box, amount in zip(boxes, ink, strict=True):
        if fragment(box, amount):
            gaps = np.maximum(0, np.maximum(lefts - box.right, box.left - rights))
            nearest = int(np.argmin(gaps))
            kept[nearest].absorb(box)
            lefts[nearest], rights[nearest] = kept[nearest].left, kept[nearest].right
    return kept


def _cuts(ink: np.ndarray, height: float) -> list[tuple[int, int]]:
    """Column ranges of the digits in one piece: the whole piece, or, when it is too wide
    for one digit, cuts at the thinnest ink near evenly spaced positions."""
    width = ink.shape[1]
    digits = _digit_count(width, height)
    if digits == 1:
        return [(0, width)]
    column_ink = ink.sum(axis=0)
    cuts = [0]
    for i in range(1, digits):
        ideal = round(width * i / digits)
        reach = max(1, int(width / (2.5 * digits)))
        low, high = max(cuts[-1] + 1, ideal - reach), min(width - 1, ideal + reach)
        if low >= high:
            continue
        cuts.append(low + int(np.argmin(column_ink[low:high])))
    cuts.append(width)
    return list(itertools.pairwise(cuts))


def _digit_count(width: int, height: float) -> int:
    """How many digits a piece this wide holds, among digits this tall."""
    if width <= _MAX_DIGIT_ASPECT * height:
        return 1
    return max(2, round(width / (_DIGIT_PITCH * height)))
