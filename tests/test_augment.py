import numpy as np

from digit_recognizer.trainer.augment import Distorter, Distortion


def _digit() -> np.ndarray:
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 12:16] = 255  # a "1"
    return image


def test_zero_distortion_is_identity():
    spec = Distortion(
        max_rotation_deg=0, max_zoom=0, max_shift_px=0, elastic_alpha_px=0, elastic_pool_size=4
    )
    images = np.stack([_digit()] * 3)
    out = Distorter(spec, 28, np.random.default_rng(0))(images)
    np.testing.assert_array_equal(out, images)


def test_distortion_keeps_ink_near_centre_and_differs_per_image():
    images = np.stack([_digit()] * 600)  # more than one chunk
    out = Distorter(Distortion(), 28, np.random.default_rng(1))(images)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out[0], out[1])
    ink = out.astype(float)
    mass = ink.sum(axis=(1, 2))
    assert (mass > 0.3 * images[0].sum()).all()  # thinned or shrunk, never pushed off
    rows = (ink.sum(axis=2) * np.arange(28)).sum(axis=1) / mass
    cols = (ink.sum(axis=1) * np.arange(28)).sum(axis=1) / mass
    assert (np.abs(rows - 13.5) < 5).all() and (np.abs(cols - 13.5) < 5).all()


def test_no_ink_bleeds_in_from_neighbouring_images():
    full = np.full((28, 28), 255, np.uint8)
    blank = np.zeros((28, 28), np.uint8)
    images = np.stack([full, blank] * 300)
    out = Distorter(Distortion(max_shift_px=6.0), 28, np.random.default_rng(2))(images)
    assert out[1::2].max() == 0


def test_same_seed_same_distortions():
    images = np.stack([_digit()] * 10)
    first = Distorter(Distortion(), 28, np.random.default_rng(5))(images)
    second = Distorter(Distortion(), 28, np.random.default_rng(5))(images)
    np.testing.assert_array_equal(first, second)
