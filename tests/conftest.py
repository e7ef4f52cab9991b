"""Shared fixtures: synthetic IDX datasets, the real MNIST directory, small ONNX models."""

from __future__ import annotations

import gc
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(
    directory: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0
) -> Path:
    """Four MNIST-layout files with random pixels and labels 0..9."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
            f"{prefix}-labels-idx1-ubyte": np.arange(n) % 10,
        }
        for name, array in files.items():
            data = idx_bytes(array)
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)
    return directory


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    return write_idx_set(tmp_path / "idx")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files: $MNIST_DATA_DIR, else ../shared/mnist beside the repository."""
    candidates = [os.environ.get("MNIST_DATA_DIR"), str(REPO.parent / "shared" / "mnist")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "t10k-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    pytest.skip("real MNIST files not found (set MNIST_DATA_DIR)")


@pytest.fixture
def tiny_model_path(tmp_path: Path) -> Path:
    from onnx_models import save, tiny_model

    return save(tiny_model(), tmp_path / "tiny.onnx")


@pytest.fixture
async def start_server():
    """Factory: a real in-process gRPC server on 127.0.0.1:0; stopped after the test."""
    from digit_recognizer.server.app import start_server as start
    from digit_recognizer.server.config import ServerConfig

    running = []

    async def factory(model_path: Path | None, model=None, **overrides):
        """`model_path`: --model; None with `model_repository=DIR` in the overrides.
        `model`: an already-loaded (or fake) model for model_path."""
        settings = {"host": "127.0.0.1", "port": 0, "metrics_port": None, "plaintext": True}
        settings["provider"] = "cpu"
        config = ServerConfig(model=model_path or Path("-"), **(settings | overrides))
        server = await start(config, model)
        running.append(server)
        return server

    yield factory
    for server in running:
        await server.stop(0)


@pytest.fixture(scope="session")
def trained_model(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real model from the trainer (6,000 images, 2 epochs), with a not-a-digit
    detector trained on 800 made-up pictures of each kind (~40 s in all), shared by tests."""
    from click.testing import CliRunner

    from digit_recognizer.trainer.cli import main

    output = tmp_path_factory.mktemp("trained") / "model.onnx"
    args = ["--data-dir", str(mnist_dir), "--train-limit", "6000", "--epochs", "2"]
    args += ["--hidden", "128", "--model-version", "7", "-o", str(output)]
    args += ["--report", str(output.parent), "--detector-pictures", "800"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (output.parent / "train.log").write_text(result.output)
    return output


@pytest.fixture
def processes():
    """Factory: `digit-server` processes on 127.0.0.1:0, killed after the test if still up."""
    from processes import ServerProcess

    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        started.append(ServerProcess(*args))
        return started[-1]

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def harness_heap_frozen():
    """The objects alive now left out of the collector's full passes while a test runs
    (for tests that time the server's loop to tenths of a second).
    The server shares this pytest process, whose heap after the suite's TensorFlow tests
    holds ~2.4 million objects: one full collection of them takes 0.27 s on this machine and
    lands wherever an allocation triggers it (CI: a 0.29 s stall as a read ended). The served
    process's own heap is ~60,000 objects (a full pass: 0.03 s)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
