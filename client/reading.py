"""Finding the digits of a written number in one picture, left to right.

The ink (client.images' recipe: grey, polarity, the paper's light divided out, contrast) is
split into connected pieces; specks, faint left-overs of uneven light and lines from one side
of the picture to the other are dropped, pieces stacked over each other (a 5's detached bar, a
4 written in two strokes) are merged, pieces well short of the digits join the one they lie
over, and a piece wider than a digit is cut where the ink is thinnest into as many digits as
its width holds, measured against the lone digits beside it (touching digits). Each piece then
becomes an MNIST-style 28x28 image with the same recipe as a single picture, from its own ink
only. Where the cut is in doubt (a wide piece: one wide digit or two touching ones?) the other
ways to cut it go in the same request (`Cut.asked`) and the model's detector decides
(`choose`). A picture whose pieces are not laid out as a number (scattered in two dimensions,
of very different heights, lines across the picture) says so (`Cut.not_a_number`), which
`Reading.reason` and /v1/read's "no_number" show.

Bounded like every request: at most `max_pieces` pieces (TooManyPieces past it, before any
per-piece work), and the work grows with the picture's pixels, not with the pieces squared: a
picture of specks (a dot every 3 px: 466,000 pieces at 2048x2048) once took minutes, merging
every speck with every column of specks found so far.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
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
# Touching digits sit about a height apart (their ink is dense where they meet): with no
# lone digit to measure, the digits in a wide piece are its width over this share of its height.
_DIGIT_PITCH = 0.9
# Narrower than this share of the height: a "1", no measure of how wide digits are.
_NARROW = 0.35
# A piece this many digit widths wide (and no wider than tall) may be two touching digits:
# the model weighs it whole and cut.
_AMBIGUOUS_WIDTH = 1.4
# Pieces under this share of the typical height are parts of digits, never digits.
_SHORT = 0.45
# A piece wider than this share of the typical height may be one wide digit or two.
_WIDE_DIGIT = 0.85
# A piece whose strongest ink is under this share of the typical piece's is left-over light.
_FAINT = 0.5
# Lines: ink spanning _SPAN of the picture's width within a band no taller than _BAND of
# it (taller: a digit cropped tight), or a merged piece that wide cut into _LINE_DIGITS or
# more; most of _ROW_MINIMUM or more pieces thinner than _LINE of their height and as tall
# as _TALL of the picture.
_SPAN = 0.9
_BAND = 0.5
_LINE_DIGITS = 3
_LINE = 0.2
_TALL = 0.9
# A rule under or over the digits: at least _RULE_LENGTH typical heights long, at most
# _RULE_THICKNESS of one thick (a touching run of digits is as thick as a digit), reaching
# across _RULE_SPAN of the digits' width.
_RULE_LENGTH = 1.5
_RULE_THICKNESS = 0.3
_RULE_SPAN = 0.8
# Pixels from the picture's top and bottom edges within which a piece touches them.
_EDGE = 1
# A row: of at least _ROW_MINIMUM pieces, _IN_ROW cross the row's middle and are within
# _SIMILAR_HEIGHT times the typical height.
_ROW_MINIMUM = 3
_IN_ROW = 0.6
_SIMILAR_HEIGHT = 2.0


@dataclass(frozen=True)
class Piece:
    """One digit-sized piece of the picture."""

    box: tuple[int, int, int, int]  # left, top, right, bottom in the picture's own pixels
    pixels: np.ndarray  # (784,) float32, MNIST-style


@dataclass(frozen=True)
class Alternative:
    """Another way to cut the same ink: `pieces` in place of the cut's pieces from index
    `start` to `stop` (a wide piece left whole, or a piece cut in two). The model decides
    which reads as digits."""

    start: int
    stop: int
    pieces: tuple[Piece, ...]


class Cut(list[Piece]):
    """The pieces of a picture left to right (a list, as find_digits always gave), with what
    the reader found out about the picture as a whole: `alternatives` (other cuts of
    ambiguous ink, to ask the model about in the same request) and `not_a_number` (why the
    layout is no number, or None)."""

    def __init__(
        self,
        pieces: Iterable[Piece] = (),
        alternatives: Iterable[Alternative] = (),
        not_a_number: str | None = None,
    ) -> None:
        super().__init__(pieces)
        self.alternatives = tuple(alternatives)
        self.not_a_number = not_a_number

    def asked(self) -> list[Piece]:
        """What one Classify request carries: the pieces, then the alternatives' pieces."""
        return [
            *self,
            *(piece for alternative in self.alternatives for piece in alternative.pieces),
        ]


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


BLANK = "the picture is blank or has too little contrast"
NOT_DIGITS = "most pieces are not digits (a texture or a scribble, not a number)"
LINES_ACROSS = "lines run across the whole picture (a texture, a rule or a shadow's edge)"
EDGE_TO_EDGE = (
    "the ink runs from the picture's top edge to its bottom edge (a pattern, or a crop "
    "through the digits: leave some paper around them)"
)


@dataclass(frozen=True)
class Reading:
    """A picture read as a number: `text` is the digits left to right; pieces the model says
    are not digits are left out of it and listed in `dropped`. `reason` says why a picture
    with pieces holds no number."""

    pieces: tuple[ReadDigit, ...]
    not_a_number: str | None = None  # the layout's verdict (Cut.not_a_number)

    @property
    def holds_a_number(self) -> bool:
        """Whether the pieces are laid out as a number and most look like digits. A texture
        or a scribble cut into pieces, where a few happen to pass the detector, is no
        number: a string of the few weak digits (gravel read as "3181111") would be
        invented, not read."""
        return self.reason is None

    @property
    def reason(self) -> str | None:
        """Why there is no number (None when there is one, or when there are no pieces)."""
        if not self.pieces:
            return self.not_a_number
        return self.not_a_number or _no_number([p.prediction.is_digit for p in self.pieces])

    @property
    def digits(self) -> tuple[ReadDigit, ...]:
        reason = self.reason
        return tuple(p for p in self.pieces if is_read(reason, p.prediction.is_digit))

    @property
    def dropped(self) -> tuple[ReadDigit, ...]:
        reason = self.reason
        return tuple(p for p in self.pieces if not is_read(reason, p.prediction.is_digit))

    @property
    def text(self) -> str:
        return "".join(p.prediction.label for p in self.digits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "digits": [p.to_dict() for p in self.digits],
            "dropped": [p.to_dict() for p in self.dropped],
            **({"no_number": self.reason} if self.reason else {}),
        }


def is_read(reason: str | None, is_digit: bool | None) -> bool:
    """Whether a chosen piece is one of the number's digits (else it is listed as dropped):
    the pieces hold a number (`reason` is None) and the model does not reject this one
    (`is_digit` None: a model without a detector)."""
    return reason is None and is_digit is not False


def _no_number(is_digit: Sequence[bool | None]) -> str | None:
    """NOT_DIGITS when half or more of the pieces fail the detector (None: no detector)."""
    accepted = sum(verdict is not False for verdict in is_digit)
    return None if accepted * 2 > len(is_digit) else NOT_DIGITS


Verdict = tuple[bool | None, float | None]  # (is_digit, digit_score) of one asked piece


def choose(cut: Cut, verdicts: Sequence[Verdict]) -> tuple[list[int], str | None]:
    """The pieces that make the reading, as indexes into `cut.asked()` left to right, and
    why they are no number (None when they are one). `verdicts` are the model's for every
    asked piece, or for the cut's own pieces only (then no alternative is weighed). The
    reader's own cut stands unless the model rejects one of its pieces there and another
    way to cut the same ink reads as digits throughout (the strongest such way: its
    weakest piece's score highest). Only then: halves of a digit pass the detector too
    (two strokes read as "1"s), so a cut the model accepts is never second-guessed."""
    runs: dict[tuple[int, int], list[range]] = {}
    # A picture of one piece the model rejects is one thing that is not a digit: cut in
    # two, a typed "A" read as "11" (each half a confident stroke of a 1).
    if len(cut) > 1 and len(verdicts) == len(cut.asked()):
        first = len(cut)
        for alternative in cut.alternatives:
            span = (alternative.start, alternative.stop)
            runs.setdefault(span, []).append(range(first, first + len(alternative.pieces)))
            first += len(alternative.pieces)
    chosen: list[int] = []
    at = 0
    for (start, stop), ways in sorted(runs.items()):
        chosen.extend(range(at, start))
        chosen.extend(_better(verdicts, range(start, stop), ways))
        at = stop
    chosen.extend(range(at, len(cut)))
    kept = [verdicts[i][0] for i in chosen]
    return chosen, (cut.not_a_number or _no_number(kept)) if chosen else None


def _better(verdicts: Sequence[Verdict], own: range, ways: list[range]) -> range:
    def digits(way: range) -> bool:
        return all(verdicts[i][0] is not False for i in way)

    def weakest(way: range) -> float:
        return min(float(verdicts[i][1] or 0.0) for i in way)

    if digits(own):
        return own
    accepted = [way for way in ways if digits(way)]
    return max(accepted, key=weakest) if accepted else own


def pixels_u8(pieces: list[Piece]) -> np.ndarray:
    return quantized(np.stack([p.pixels for p in pieces]))


def assemble(pieces: list[Piece], predictions: list[Prediction]) -> Reading:
    """The reading of `pieces` (a Cut, or a plain list) from the model's `predictions` for
    each of them, or, for a Cut, for each of `cut.asked()`."""
    cut = pieces if isinstance(pieces, Cut) else Cut(pieces)
    asked = cut.asked() if len(predictions) != len(cut) else list(cut)
    verdicts = [(p.is_digit, p.digit_score) for p in predictions]
    chosen, _ = choose(cut, verdicts)
    return Reading(tuple(ReadDigit(asked[i].box, predictions[i]) for i in chosen), cut.not_a_number)


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
) -> Cut:
    """The digit-sized pieces of a picture, left to right; none for a blank picture.
    ImageError when it cannot be read, or when scipy is not installed; TooManyPieces when it
    holds more than `max_pieces` pieces of ink, or wide pieces that would cut into more."""
    ndimage = _ndimage()
    label = name or _describe(source)
    try:
        ink, scale = to_ink(source, label, max_decoded_bytes)
    except BlankPicture:
        return Cut(not_a_number=BLANK)
    mask = ink > 0
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return Cut(not_a_number=BLANK)
    boxes, sizes = _pieces_of_ink(labelled, ink, count, label, max_pieces)
    if not boxes:  # every piece of ink was a line across the picture
        return Cut(not_a_number=LINES_ACROSS)
    boxes = _merge_stacked(sorted(_without_rules_and_frames(boxes), key=lambda b: b.left))
    boxes = _absorb_fragments(boxes, sizes)
    height = float(np.median([b.height for b in boxes]))
    pitch = _pitch(boxes, height)
    counts = [_digit_count(b.width, height, pitch) for b in boxes]
    if sum(counts) > max_pieces:
        raise _too_many(label, f"ink that cuts into {sum(counts):,} digit-sized pieces", max_pieces)
    # Which box each label belongs to (0: a speck, in none): one lookup per pixel of a box.
    owner = np.zeros(count + 1, np.int32)
    for number, box in enumerate(boxes, start=1):
        owner[list(box.labels)] = number
    pieces: list[Piece] = []
    alternatives: list[Alternative] = []
    spare = max_pieces - sum(counts)  # what one request may still carry beside the pieces
    for number, (box, digits) in enumerate(zip(boxes, counts, strict=True), start=1):
        # The box's own ink only (a neighbour's stroke may reach into it), within the box:
        # masking the whole picture per box would cost a full pass each.
        window = (slice(box.top, box.bottom), slice(box.left, box.right))
        own = np.where(owner[labelled[window]] == number, ink[window], 0.0)
        start = len(pieces)
        pieces.extend(_pieces(own, box, _cuts(own, digits), scale))
        for other in _other_counts(box.width, height, pitch, digits):
            if other > spare:
                break  # the request would be refused: the reader's own cut alone
            cut = tuple(_pieces(own, box, _cuts(own, other), scale))
            alternatives.append(Alternative(start, len(pieces), cut))
            spare -= len(cut)
    return Cut(pieces, alternatives, _layout(boxes, counts, pieces, ink.shape, scale))


def _pieces(
    own: np.ndarray, box: _Box, columns: list[tuple[int, int]], scale: float
) -> list[Piece]:
    """The pieces of one box's ink cut at `columns`, each cropped to its ink."""
    pieces = []
    for left, right in columns:
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
    labelled: np.ndarray, ink: np.ndarray, count: int, label: str, max_pieces: int
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
    peaks = np.zeros(count, np.float32)
    np.maximum.at(peaks, index, ink[rows, cols])
    heights = bottom + 1 - top
    tallest, total = int(heights.max()), float(sizes.sum())
    # A speck is short beside the tallest piece and holds little of the ink. When the tallest
    # piece is itself a speck (a picture of dots), every dot passes: the caller's limit on
    # pieces refuses such a picture.
    kept = (heights >= _SPECK_HEIGHT * tallest) | (sizes >= _SPECK_INK * total)
    # Ink from one side of the picture to the other, in a band of it, is a line (a rule, a
    # shadow's edge, a stripe or grain of a texture): no digit reaches that far.
    kept &= (right + 1 - left < _SPAN * labelled.shape[1]) | (heights > _BAND * labelled.shape[0])
    # Faint pieces beside strong ones are what is left of uneven light, not a pen's stroke.
    if kept.any():
        kept &= peaks >= _FAINT * float(np.median(peaks[kept]))
    chosen = np.flatnonzero(kept)
    if len(chosen) > max_pieces:
        raise _too_many(label, f"{len(chosen):,} pieces of ink", max_pieces)
    boxes = [
        _Box(int(left[i]), int(top[i]), int(right[i]) + 1, int(bottom[i]) + 1, {int(i) + 1})
        for i in chosen
    ]
    return boxes, sizes


def _without_rules_and_frames(boxes: list[_Box]) -> list[_Box]:
    """An underline or a box drawn around the digits (a form's field) is not a digit, and
    merged with the digits it runs under or around it spoils them. Left out: a frame, a
    piece whose box holds every other piece; a rule, a piece much longer than the digits
    are tall and much thinner, under or over every other piece and as wide as most of
    them together. Only those: blobs of a texture that happen to hold or underline a few
    others must still count against it being a number. Judged beside two or more others."""
    if len(boxes) < 3:
        return boxes
    edges = np.array([(b.left, b.top, b.right, b.bottom) for b in boxes])
    widths, heights = edges[:, 2] - edges[:, 0], edges[:, 3] - edges[:, 1]
    typical = float(np.median(heights))
    long_and_thin = (widths >= _RULE_LENGTH * typical) & (heights <= _RULE_THICKNESS * typical)
    thin = np.flatnonzero(long_and_thin)
    # The candidates: the largest piece (a frame holds all the others) and one or two rules;
    # a picture with more thin long pieces is lines, not a number in a field.
    candidates = [int(np.argmax(widths * heights)), *(thin if len(thin) <= 2 else [])]
    for i in candidates:
        others = np.delete(edges, i, axis=0)
        left, top, right, bottom = edges[i]
        frame = (
            left <= others[:, 0].min() and others[:, 2].max() <= right
            and top <= others[:, 1].min() and others[:, 3].max() <= bottom
        )  # fmt: skip
        span = min(right, others[:, 2].max()) - max(left, others[:, 0].min())
        rule = (
            long_and_thin[i]
            and span >= _RULE_SPAN * (others[:, 2].max() - others[:, 0].min())
            and (top >= others[:, 3].max() - _RULE_THICKNESS * typical
                 or bottom <= others[:, 1].min() + _RULE_THICKNESS * typical)
        )  # fmt: skip
        if frame or rule:
            return [box for j, box in enumerate(boxes) if j != i]
    return boxes


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
    """Pieces well short of the digits (a 5's bar reaching past its body, the end of a
    stroke the pen was lifted from, a faint break in a stroke), and small short ones, join
    the piece they lie over, or else the nearest, instead of counting as digits; one further
    than a digit's height from every digit is dropped. A "1" is short of ink but full
    height: it stays."""
    if len(boxes) < 2:
        return boxes
    ink = [float(sum(sizes[label - 1] for label in b.labels)) for b in boxes]
    typical_ink, typical_height = float(np.median(ink)), float(np.median([b.height for b in boxes]))

    def fragment(box: _Box, amount: float) -> bool:
        small = (
            amount < _FRAGMENT_INK * typical_ink and box.height < _FRAGMENT_HEIGHT * typical_height
        )
        return small or box.height < _SHORT * typical_height

    kept = [b for b, amount in zip(boxes, ink, strict=True) if not fragment(b, amount)]
    if not kept:
        return boxes
    # The kept boxes' edges as arrays: the one overlapping most (or nearest) in one
    # vectorised step per fragment; edges move as fragments join.
    lefts = np.array([k.left for k in kept])
    rights = np.array([k.right for k in kept])
    for box, amount in zip(boxes, ink, strict=True):
        if fragment(box, amount):
            # Overlap when positive, minus the gap otherwise.
            reach = np.minimum(rights, box.right) - np.maximum(lefts, box.left)
            nearest = int(np.argmax(reach))
            if reach[nearest] < -typical_height:
                continue
            kept[nearest].absorb(box)
            lefts[nearest], rights[nearest] = kept[nearest].left, kept[nearest].right
    return kept


def _pitch(boxes: list[_Box], height: float) -> float:
    """How far apart the digits of this picture sit: the typical width of its pieces that
    are one digit each (full height, neither a narrow "1" nor wider than tall), or, when
    there is none, _DIGIT_PITCH of their height."""
    single = [
        b.width
        for b in boxes
        if b.height >= _FRAGMENT_HEIGHT * height and _NARROW * height <= b.width <= height
    ]
    return float(np.median(single)) if single else _DIGIT_PITCH * height


def _digit_count(width: int, height: float, pitch: float) -> int:
    """How many digits a piece this wide holds, among digits this tall this far apart: one
    unless it is wider than a digit is tall."""
    if width <= _MAX_DIGIT_ASPECT * height:
        return 1
    return max(1, round(width / pitch))


def _other_counts(width: int, height: float, pitch: float, digits: int) -> list[int]:
    """Other ways a piece may be cut, for the model to weigh: a digit fewer or more, and
    whole, when cut; in two, when it is one piece wide for a digit (a lone wide piece may
    be one wide digit, or two touching)."""
    if digits > 1:
        return sorted({1, digits - 1, digits + 1} - {digits})
    if width > _AMBIGUOUS_WIDTH * pitch or width > _WIDE_DIGIT * height:
        return [2]
    return []


def _cuts(ink: np.ndarray, digits: int) -> list[tuple[int, int]]:
    """Column ranges of `digits` digits in one piece: the whole piece, or cuts at the
    thinnest ink near evenly spaced positions."""
    width = ink.shape[1]
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


def _layout(
    boxes: list[_Box],
    counts: list[int],
    pieces: list[Piece],
    shape: tuple[int, ...],
    scale: float,
) -> str | None:
    """Why these pieces are not laid out as a number, or None. A number is a row of
    digit-sized pieces of similar height sharing a band across the row: ink that runs
    across the whole picture is a line (a texture, a rule, a shadow's edge), pieces that
    do not share a band are scattered in two dimensions (dots, gravel)."""
    for box, digits in zip(boxes, counts, strict=True):
        if digits >= _LINE_DIGITS and box.width >= _SPAN * shape[1]:
            return LINES_ACROSS
    if len(pieces) < _ROW_MINIMUM:
        return None
    lines = [b.height >= _TALL * shape[0] and b.width < _LINE * b.height for b in boxes]
    if np.mean(lines) >= _IN_ROW:
        return "lines run across the whole picture's height (a texture or a pattern)"
    # Digits on paper have paper above and below them; bands from edge to edge are a pattern
    # (wood grain read as "1111" before) or a crop through the ink. Touching one edge is
    # enough when the piece is nearly as tall as the picture: a dense texture's merged
    # blobs stop a few pixels short of the other edge (grain read as "1113").
    edge_to_edge = [
        (b.top <= _EDGE or b.bottom >= shape[0] - _EDGE) and b.height >= _TALL * shape[0]
        for b in boxes
    ]
    if np.mean(edge_to_edge) >= _IN_ROW:
        return EDGE_TO_EDGE
    tops = np.array([p.box[1] for p in pieces], np.float64) / scale
    bottoms = np.array([p.box[3] for p in pieces], np.float64) / scale
    band = float(np.median((tops + bottoms) / 2))
    if np.mean((tops <= band) & (band <= bottoms)) < _IN_ROW:
        return "the pieces are scattered over the picture, not written in a row"
    heights = bottoms - tops
    typical = float(np.median(heights))
    similar = (heights >= typical / _SIMILAR_HEIGHT) & (heights <= typical * _SIMILAR_HEIGHT)
    if np.mean(similar) < _IN_ROW:
        return "the pieces differ too much in height to be the digits of a number"
    return None
