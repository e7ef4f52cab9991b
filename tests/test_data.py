import gzip
from pathlib import Path

import numpy as np
import pytest

from digit_recognizer.trainer.data import DataError, load_dataset, read_idx, resolve_data_dir

from conftest import idx_bytes, write_idx_set


@pytest.mark.parametrize("gz", [True, False])
def test_loads_idx_directory_gzipped_or_raw(tmp_path, gz):
    dataset = load_dataset(write_idx_set(tmp_path, n_train=30, n_test=10, gz=gz))
    assert dataset.x_train.shape == (30, 28, 28) and dataset.x_train.dtype == np.uint8
    assert dataset.y_test.tolist() == list(range(10))


def test_loads_real_mnist(mnist_dir):
    dataset = load_dataset(mnist_dir)
    assert dataset.x_train.shape == (60000, 28, 28)
    assert dataset.x_test.shape == (10000, 28, 28)
    assert sorted(set(dataset.y_test.tolist())) == list(range(10))


def test_loads_npz_file_and_directory(tmp_path, idx_dir):
    source = load_dataset(idx_dir)
    npz = tmp_path / "npzdir" / "mnist.npz"
    npz.parent.mkdir()
    np.savez(
        npz,
        x_train=source.x_train,
        y_train=source.y_train,
        x_test=source.x_test,
        y_test=source.y_test,
    )
    for location in (npz, npz.parent):
        loaded = load_dataset(location)
        np.testing.assert_array_equal(loaded.x_test, source.x_test)


def test_flag_wins_over_environment_over_shared_over_download(monkeypatch, tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("MNIST_DATA_DIR", "/from/env")
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(None) == Path("/from/env")
    monkeypatch.delenv("MNIST_DATA_DIR")
    assert resolve_data_dir(None) is None  # the Keras download
    write_idx_set(tmp_path / "shared" / "mnist")
    assert resolve_data_dir(None) == Path("../shared/mnist")


def _corrupt(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: b"\x08\x03" + raw[2:], "bad magic number"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], "is not unsigned byte"),
        (lambda raw: raw[:-100], "the file holds"),
        (lambda raw: raw[:10], "truncated IDX header"),
        (lambda raw: b"", "bad magic number empty"),
    ],
)
def test_malformed_idx_names_the_file(idx_dir, mutate, message):
    target = idx_dir / "t10k-images-idx3-ubyte.gz"
    _corrupt(target, mutate(gzip.decompress(target.read_bytes())))
    with pytest.raises(DataError, match=message) as info:
        load_dataset(idx_dir)
    assert str(target) in str(info.value)


def test_truncated_gzip_names_the_file(idx_dir):
    target = idx_dir / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:30])
    with pytest.raises(DataError, match="cannot read") as info:
        load_dataset(idx_dir)
    assert str(target) in str(info.value)


def test_label_count_mismatch(idx_dir):
    (idx_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7))))
    with pytest.raises(DataError, match="7 labels for 20 images"):
        load_dataset(idx_dir)


def test_wrong_image_size(idx_dir):
    (idx_dir / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((20, 32, 32))))
    )
    with pytest.raises(DataError, match="must be 28x28"):
        load_dataset(idx_dir)


def test_labels_beyond_class_names(idx_dir):
    dataset = load_dataset(idx_dir)
    with pytest.raises(DataError, match="labels go up to 9, but only 5 class names"):
        dataset.validate_labels(5)


def test_missing_files_are_listed(tmp_path, idx_dir):
    (idx_dir / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing IDX files for: train labels"):
        load_dataset(idx_dir)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nowhere")


def test_bad_npz(tmp_path):
    broken = tmp_path / "mnist.npz"
    broken.write_bytes(b"PK not really a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_dataset(broken)
    np.savez(broken, x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="missing arrays y_train, x_test, y_test"):
        load_dataset(broken)


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(path), array)
