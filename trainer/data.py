"""Loading MNIST-layout datasets: the four IDX files (gzipped or raw) or a Keras `mnist.npz`.

Any dataset in this layout (MNIST, Fashion-MNIST, KMNIST, EMNIST digits) loads unchanged.
Every problem with a file is reported as one `DataError` line that names the file, because the
person running the trainer needs to know which download is broken, not where numpy gave up.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digit_recognizer.protos.contract import IMAGE_SIDE, PIXELS_PER_IMAGE

IDX_UBYTE = 0x08
DATA_DIR_ENV = "MNIST_DATA_DIR"

# (split, kind) -> glob patterns; MNIST ships `train-images-idx3-ubyte`, some mirrors use
# `train-images.idx3-ubyte`, EMNIST prefixes `emnist-digits-`.
_IDX_PATTERNS = {
    ("train", "images"): ("*train-images*idx3*",),
    ("train", "labels"): ("*train-labels*idx1*",),
    ("test", "images"): ("*t10k-images*idx3*", "*test-images*idx3*"),
    ("test", "labels"): ("*t10k-labels*idx1*", "*test-labels*idx1*"),
}


class DataError(Exception):
    """A dataset file is missing or malformed. The message is one line naming the file."""


@dataclass(frozen=True)
class Dataset:
    """uint8 images shaped (N, 28, 28) with light ink on a dark background, and integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where it was read from, for messages on this machine
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, for the card

    def describe(self, train_images: int | None = None) -> dict[str, object]:
        """What the data was, for a model card that travels: no local paths."""
        return {
            "name": "mnist",
            "train_images": len(self.x_train) if train_images is None else train_images,
            "test_images": len(self.x_test),
            "files": dict(self.files),
        }

    def validate_labels(self, num_classes: int) -> None:
        for name, labels in (("training", self.y_train), ("test", self.y_test)):
            if labels.size and int(labels.max()) >= num_classes:
                raise DataError(
                    f"{self.source}: {name} labels go up to {int(labels.max())}, "
                    f"but only {num_classes} class names were given"
                )


SHARED_DATA_DIR = Path("..") / "shared" / "mnist"  # beside the checkout, as CI lays it out


def resolve_data_dir(flag: str | os.PathLike[str] | None) -> Path | None:
    """Where MNIST is read from, in this order (the one place that decides it): the
    `--data-dir` flag, else $MNIST_DATA_DIR, else ../shared/mnist (from the current
    directory) when it holds the files, else None, meaning the usual Keras download."""
    chosen = flag if flag else os.environ.get(DATA_DIR_ENV) or None
    if chosen:
        return Path(chosen)
    shared = SHARED_DATA_DIR
    return shared if any(shared.glob("t10k-images*")) or (shared / "mnist.npz").is_file() else None


def load_dataset(location: Path | None) -> Dataset:
    """Load from a directory of IDX files, a directory holding `mnist.npz`, an `.npz` file,
    or (location None) the Keras download."""
    if location is None:
        return _load_keras_download()
    if not location.exists():
        raise DataError(f"{location}: no such file or directory")
    if location.is_file():
        return load_npz(location)
    idx_files = {key: _find_one(location, patterns) for key, patterns in _IDX_PATTERNS.items()}
    if all(path is not None for path in idx_files.values()):
        return _load_idx_set(location, idx_files)  # type: ignore[arg-type]
    npz = location / "mnist.npz"
    if npz.is_file():
        return load_npz(npz)
    missing = [f"{split} {kind}" for (split, kind), path in idx_files.items() if path is None]
    raise DataError(
        f"{location}: no MNIST data found (missing IDX files for: {', '.join(missing)}; "
        "expected e.g. train-images-idx3-ubyte.gz, or mnist.npz)"
    )


def _find_one(directory: Path, patterns: tuple[str, ...]) -> Path | None:
    matches = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
    if len(matches) > 1:
        # Prefer the compressed copy when both a .gz and its unpacked twin are present.
        gz = [p for p in matches if p.suffix == ".gz"]
        matches = gz if len(gz) == 1 else matches
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DataError(f"{directory}: several files could be the same split ({names})")
    return matches[0] if matches else None


def _load_idx_set(directory: Path, files: dict[tuple[str, str], Path]) -> Dataset:
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(
                f"{files[(split, 'images')]}: images must be 28x28, got shape {images.shape}"
            )
        if labels.ndim != 1:
            raise DataError(f"{files[(split, 'labels')]}: labels must be 1-D, got {labels.shape}")
        if len(images) != len(labels):
            raise DataError(
                f"{files[(split, 'labels')]}: {len(labels)} labels for {len(images)} images "
                f"in {files[(split, 'images')].name}"
            )
    return Dataset(
        x_train=arrays[("train", "images")],
        y_train=arrays[("train", "labels")],
        x_test=arrays[("test", "images")],
        y_test=arrays[("test", "labels")],
        source=str(directory),
        files={path.name: _sha256(path) for path in sorted(files.values())},
    )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file of unsigned bytes, gzipped or raw (detected from the content)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != IDX_UBYTE:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    if ndim not in (1, 3):
        raise DataError(f"{path}: IDX file has {ndim} dimensions, expected 1 (labels) or 3")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(shape))
    body = len(raw) - header_len
    if body != expected:
        raise DataError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file holds {body} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def load_npz(path: Path) -> Dataset:
    """A Keras-style `mnist.npz` with x_train, y_train, x_test, y_test."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)}")
            arrays = {k: np.asarray(npz[k]) for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or x.dtype != np.uint8:
            raise DataError(f"{path}: x_{split} must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split} must hold {len(x)} integer labels, got {y.shape}")
        if y.size and int(y.min()) < 0:
            raise DataError(f"{path}: y_{split} holds negative labels")
    return Dataset(
        x_train=arrays["x_train"],
        y_train=arrays["y_train"].astype(np.uint8),
        x_test=arrays["x_test"],
        y_test=arrays["y_test"].astype(np.uint8),
        source=str(path),
        files={path.name: _sha256(path)},
    )


def _load_keras_download() -> Dataset:
    import keras  # deferred: TensorFlow is slow to import and only the trainer needs it

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # network or cache failures all mean the same to the user
        raise DataError(
            f"keras MNIST download failed ({exc}); pass --data-dir or set {DATA_DIR_ENV}"
        ) from None
    # load_data verified the download against this hash: it is the file's sha256.
    files = {"mnist.npz": "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"}
    return Dataset(x_train, y_train, x_test, y_test, "keras.datasets.mnist", files)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_model_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1]: the service's input contract."""
    return images.reshape(len(images), PIXELS_PER_IMAGE).astype(np.float32) / 255.0
