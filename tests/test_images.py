"""Picture preprocessing on generated pictures with known expected outcomes."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from digit_recognizer.client.errors import ImageError
from digit_recognizer.client.images import to_mnist

from pictures import photo_style


def bar_digit(size=(300, 200), box=(60, 90, 240, 110), ink=30, paper=235) -> Image.Image:
    """A "1": a dark vertical bar on light paper (box = top, left, bottom, right)."""
    canvas = np.full(size, paper, np.uint8)
    top, left, bottom, right = box
    canvas[top:bottom, left:right] = ink
    return Image.fromarray(canvas, "L")


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    image = pixels.reshape(28, 28)
    rows, cols = np.indices(image.shape)
    mass = image.sum()
    return float((rows * image).sum() / mass), float((cols * image).sum() / mass)


def ink_box(pixels: np.ndarray) -> tuple[int, int]:
    image = pixels.reshape(28, 28) > 0.1
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def assert_mnist_like(pixels: np.ndarray) -> None:
    assert pixels.shape == (784,) and pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() == pytest.approx(1.0, abs=0.05)
    row, col = centre_of_mass(pixels)
    assert abs(row - 14) <= 1 and abs(col - 14) <= 1
    height, width = ink_box(pixels)
    assert max(height, width) <= 21
    frame = pixels.reshape(28, 28)
    assert np.median(frame) == 0  # a clean black background, as in MNIST


def test_dark_ink_on_light_paper_is_inverted_fitted_and_centred():
    pixels = to_mnist(bar_digit())
    assert_mnist_like(pixels)
    height, width = ink_box(pixels)
    assert height == 20 and width <= 6  # tall and thin, aspect ratio kept


def test_off_centre_digit_on_a_big_canvas_is_centred():
    pixels = to_mnist(bar_digit(size=(1200, 1600), box=(900, 1400, 1150, 1440)))
    assert_mnist_like(pixels)


def test_light_ink_on_dark_background_is_not_inverted():
    inverted = Image.fromarray(255 - np.asarray(bar_digit()), "L")
    np.testing.assert_allclose(to_mnist(inverted), to_mnist(bar_digit()), atol=1e-6)


def test_rgba_drawing_on_a_transparent_canvas():
    alpha = 255 - np.asarray(bar_digit(ink=0, paper=255))
    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., 3] = alpha  # black ink, fully transparent elsewhere (a typical canvas export)
    pixels = to_mnist(Image.fromarray(rgba, "RGBA"))
    assert_mnist_like(pixels)
    np.testing.assert_allclose(pixels, to_mnist(bar_digit(ink=0, paper=255)), atol=0.02)


def test_jpeg_noise_and_palette_images():
    for data in (
        encode(bar_digit().convert("RGB"), "JPEG", quality=40),
        encode(bar_digit().convert("P"), "GIF"),
        encode(bar_digit(), "BMP"),
        encode(bar_digit().convert("RGB"), "WEBP"),
        encode(bar_digit(), "TIFF"),
    ):
        assert_mnist_like(to_mnist(data))


def test_tiny_and_large_pictures():
    assert_mnist_like(to_mnist(bar_digit(size=(12, 10), box=(2, 4, 10, 6))))
    assert_mnist_like(to_mnist(bar_digit(size=(3000, 2500), box=(500, 1000, 2500, 1150))))


def test_exif_orientation_is_applied():
    # Stored as a horizontal bar with EXIF orientation 6 ("rotate 90 degrees to display"):
    # the person saw a vertical "1".
    stored = bar_digit(size=(200, 300), box=(90, 60, 110, 240)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = to_mnist(encode(stored, "JPEG", exif=exif, quality=95))
    height, width = ink_box(pixels)
    assert height == 20 and width <= 6


def test_mnist_style_28x28_passes_through_untouched(mnist_dir):
    from pictures import load_test_digits

    digits, _ = load_test_digits(mnist_dir, 5)
    for digit in digits:
        pixels = to_mnist(encode(Image.fromarray(digit), "PNG"))
        np.testing.assert_array_equal(pixels, digit.reshape(784) / np.float32(255))


def test_photo_style_pictures_keep_the_digit(mnist_dir):
    from pictures import load_test_digits

    digits, _ = load_test_digits(mnist_dir, 3)
    rng = np.random.default_rng(0)
    for digit in digits:
        for kind in ("png", "jpeg", "rgba"):
            picture = photo_style(digit, rng, kind)
            fmt = {"png": "PNG", "jpeg": "JPEG", "rgba": "PNG"}[kind]
            pixels = to_mnist(encode(picture, fmt))
            assert_mnist_like(pixels)
            # Same digit, same place: close to the original MNIST frame.
            assert np.corrcoef(pixels, digit.reshape(784))[0, 1] > 0.6


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Image.new("L", (200, 200), 240), "no digit found"),
        (lambda: Image.new("RGBA", (50, 50), (0, 0, 0, 0)), "no digit found"),
        (lambda: b"this is not an image", "not an image Pillow can read"),
        (lambda: encode(bar_digit(), "PNG")[:300], "cannot decode image"),
    ],
)
def test_unusable_pictures_name_the_source(make, message):
    with pytest.raises(ImageError, match=message) as info:
        to_mnist(make(), name="photo.png")
    assert str(info.value).startswith("photo.png: ")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        to_mnist(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        to_mnist(tmp_path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A valid 20000x20000 grey PNG of a few hundred kB: 400M pixels when decoded.
    width = height = 20000
    raw = zlib.compress(b"".join(b"\x00" + b"\xff" * width for _ in range(height)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageError, match=r"bomb\.png: .*(decompression.bomb)"):
        to_mnist(bomb)


def _stroke(mode: str, ink, paper) -> Image.Image:
    values = np.full((60, 40), paper, dtype=np.float64)
    values[10:50, 18:24] = ink
    if mode in ("I", "F"):
        return Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    if mode == "I;16":
        return Image.fromarray(values.astype(np.uint16))  # Pillow picks I;16
    grey = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        return grey.convert("P")
    if mode == "LA":  # ink on a transparent canvas
        alpha = Image.fromarray(((values == ink) * 255).astype(np.uint8), mode="L")
        return Image.merge("LA", (grey, alpha))
    return grey.convert(mode)


@pytest.mark.parametrize(
    ("mode", "ink", "paper"),
    [
        ("I", 2_000_000_000, -2_000_000_000),  # the probe's 32-bit TIFF
        ("I", 0, 255),
        ("I;16", 0, 65535),
        ("F", 0.0, 255.0),  # float samples on a 0-255 scale
        ("F", 0.0, 1.0),
        ("P", 0, 255),
        ("LA", 0, 255),
        ("RGBA", 0, 255),
        ("1", 0, 255),
    ],
)
def test_every_mode_lands_in_0_1_with_the_stroke_as_ink(mode, ink, paper):
    pixels = to_mnist(_stroke(mode, ink, paper), f"stroke-{mode}")
    assert pixels.dtype == np.float32 and np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() == pytest.approx(1.0)
    image = pixels.reshape(28, 28)
    assert image[:, 12:16].sum() > 5 * image[:, :6].sum()  # a vertical stroke in the middle


def test_a_28x28_32_bit_picture_is_scaled_not_passed_through():
    """The probe: MNIST-shaped int32 samples of +-2e9 reached the model as +-30518."""
    values = np.full((28, 28), -2_000_000_000, np.int32)
    values[6:22, 13:16] = 2_000_000_000
    pixels = to_mnist(Image.fromarray(values, mode="I"), "int32.tiff").reshape(28, 28)
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert pixels[6:22, 13:16].min() == 1.0 and pixels[:, :10].max() == 0.0


def test_a_broken_exif_block_does_not_lose_the_picture():
    stored = bar_digit(size=(200, 300), box=(60, 90, 240, 110)).convert("RGB")
    broken = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05garbage" + bytes(range(256)) * 4
    pixels = to_mnist(encode(stored, "JPEG", exif=broken, quality=95))
    assert_mnist_like(pixels)


def test_thin_pen_strokes_are_thickened_to_mnist_width():
    from PIL import ImageDraw

    canvas = Image.new("L", (400, 400), 255)
    ImageDraw.Draw(canvas).line([(60, 60), (340, 60), (150, 360)], fill=0, width=3)  # a "7"
    pixels = to_mnist(canvas).reshape(28, 28)
    # A 3-pixel pen on 400 pixels would be a hairline at 20: 18 inked pixels unthickened;
    # MNIST's strokes are ~2 pixels wide, so about three times that.
    assert int((pixels > 0.5).sum()) >= 40


def in_shade(picture: Image.Image, from_column: int, light: float = 0.5) -> Image.Image:
    """The picture with everything right of `from_column` in shadow: paper and ink alike get
    `light` of the light (a hand or a phone between the lamp and the page)."""
    pixels = np.asarray(picture, np.float32).copy()
    pixels[:, from_column:] *= light
    return Image.fromarray(pixels.astype(np.uint8))


def test_a_blank_page_half_in_shadow_is_blank():
    page = in_shade(Image.new("L", (300, 200), 235), 170)
    with pytest.raises(ImageError, match="no digit found"):
        to_mnist(page)


def test_a_shadow_across_the_page_does_not_become_ink():
    """A "1" on a page whose right half is in shadow: the same digit as in full light, not
    a bar beside a dark block (the shadow taken for ink as dark as the pen's)."""
    lit = to_mnist(bar_digit())
    for edge in (120, 150):  # the shadow's edge beside the bar, and across it
        shaded = to_mnist(in_shade(bar_digit(), edge))
        assert_mnist_like(shaded)
        assert np.corrcoef(shaded, lit)[0, 1] > 0.9


def test_dark_ink_on_paper_mostly_in_shadow_stays_dark_ink():
    """A shadow over most of the page (the border's median under half light) is still
    paper: the pen is the dark side, not the strip of page left in full light."""
    lit = to_mnist(bar_digit())
    shaded = in_shade(bar_digit(), 40, light=0.5)  # paper 117 of 255 on most of the border
    pixels = to_mnist(shaded)
    assert_mnist_like(pixels)
    assert np.corrcoef(pixels, lit)[0, 1] > 0.9


def test_a_faint_speck_away_from_the_digit_does_not_shrink_it():
    """Faint ink (what is left of a shadow's edge, a smudge, JPEG noise) far from the digit
    must not stretch the box the digit is fitted in: the digit would come out small and
    off-centre (a hard shadow across a handwritten digit: 79% read right, 96% after)."""
    clean = bar_digit()
    smudged = np.asarray(clean).copy()
    smudged[10:18, 10:18] = 160  # a third as dark as the pen, in the corner
    pixels = to_mnist(Image.fromarray(smudged))
    assert_mnist_like(pixels)
    np.testing.assert_allclose(pixels, to_mnist(clean), atol=0.05)


def test_the_light_estimate_filters_match_their_plain_definitions():
    """The paper's light comes from running extremes and a box mean computed in whole-array
    steps for speed; they must equal the plain sliding-window definitions (beyond an edge:
    nothing for the extremes, the edge repeated for the mean), for any shape and window."""
    from digit_recognizer.client.images import _box_mean, _running

    rng = np.random.default_rng(0)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(1, 60, 2))
        values = rng.random((height, width)).astype(np.float32)
        window = int(rng.integers(1, 70))
        for axis, pick, reduce in [(0, np.maximum, np.max), (1, np.minimum, np.min)]:
            moved = np.moveaxis(values, axis, 0)
            start = np.arange(len(moved)) - window // 2
            plain = np.stack([reduce(moved[max(0, s) : s + window], axis=0) for s in start])
            got = _running(values, window, axis, pick)
            assert np.array_equal(got, np.moveaxis(plain, 0, axis)), (values.shape, window)
        padded = np.pad(values, 2, "edge")
        plain_mean = np.array(
            [[padded[r : r + 5, c : c + 5].mean() for c in range(width)] for r in range(height)]
        )
        assert np.allclose(_box_mean(values, 5), plain_mean, atol=1e-6)
