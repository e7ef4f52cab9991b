"""`digit-client` as a user meets it: what it imports, which target wins, what its help says,
--version, the token on every command, and `info` as typed JSON; against real servers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from digit_recognizer.client.cli import main
from digit_recognizer.protos import digits_pb2
from digit_recognizer.protos.contract import ModelCard

from onnx_models import CARD, save, tiny_model

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "PIL", "numpy", "rich")  # what a probe or a bare import must not load

DETECTOR = {
    "output": "digit_score",
    "threshold": 0.42,
    "calibration": {"method": "platt", "scale": 1.5, "shift": -0.25},
}
LIBRARIES = {"python": "3.11.9", "tensorflow-cpu": "2.21.0", "onnxruntime": "1.23.2"}
DATASET = {"name": "mnist", "train_images": 60000, "test_images": 10000}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `digit-server` process with a tiny model whose card is like the trainer's: a dataset
    described in JSON, a training config, a detector entry and library versions."""
    from processes import ServerProcess

    card = ModelCard(
        **{
            **CARD.__dict__,
            "dataset": json.dumps(DATASET, sort_keys=True),
            "training_config": {"epochs": 5, "hidden": [512], "optimizer": "rmsprop"},
            "library_versions": LIBRARIES,
            "detector": DETECTOR,
        }
    )
    model = save(tiny_model(card), tmp_path_factory.mktemp("cli") / "tiny.onnx")
    server = ServerProcess("--model", str(model))
    port = server.wait_serving()
    yield f"127.0.0.1:{port}"
    server.kill()


@pytest.fixture
def unreachable() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


# Import cost: a bare import and a health probe load neither Pillow nor scipy nor numpy.


def test_importing_the_client_loads_nothing_heavy():
    loaded = _loaded_after("import digit_recognizer.client")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_the_public_names_still_import_and_scipy_waits_for_a_number():
    names = "DigitClient, AsyncDigitClient, ImageError, to_mnist, find_digits, Reading"
    loaded = _loaded_after(f"from digit_recognizer.client import {names}")
    assert "scipy" not in loaded and "PIL" in loaded  # to_mnist's module holds Pillow
    picture = REPO / "examples" / "mnist-0-label7.png"
    reading = _loaded_after(
        f"from digit_recognizer.client import find_digits\nassert find_digits({str(picture)!r})"
    )
    assert "scipy" in reading


def test_a_health_probe_loads_no_pictures_no_arrays_no_tables(served):
    code = (
        "import sys\nfrom digit_recognizer.client.cli import main\n"
        f"try:\n    main(['health', '--target', {served!r}])\n"
        "except SystemExit as exit:\n    assert exit.code == 0, exit.code"
    )
    loaded = _loaded_after(code)
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_reading_without_scipy_names_the_extra_to_install(served):
    picture = str(REPO / "examples" / "mnist-0-label7.png")
    code = (
        "import sys\nsys.modules['scipy'] = None  # as if not installed\n"
        "from digit_recognizer.client import ImageError, find_digits\n"
        f"try:\n    find_digits({picture!r})\nexcept ImageError as exc:\n    print(exc)\n"
        "from digit_recognizer.client.cli import main\n"
        f"main(['read', '--target', {served!r}, {picture!r}])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    hint = "reading numbers needs scipy: pip install 'digit-recognizer[read]'"
    assert done.stdout.strip() == hint
    assert done.returncode == 1 and done.stderr.strip() == f"Error: {hint}"


# Which target: what is typed beats the environment, wherever it is typed.


def test_a_typed_target_beats_digits_target_before_or_after_the_subcommand(served, unreachable):
    env = {"DIGITS_TARGET": unreachable, "DIGITS_TIMEOUT": "2"}
    for args in (("--target", served, "health"), ("health", "--target", served)):
        result = run(*args, env=env)
        assert (result.exit_code, result.output.strip()) == (0, "SERVING"), args
    assert run("health", env={"DIGITS_TARGET": served}).output.strip() == "SERVING"
    ignored = run("health", env=env)  # the environment alone still counts
    assert ignored.exit_code == 1 and unreachable in ignored.stderr
    after_wins = run("--target", unreachable, "health", "--target", served)
    assert (after_wins.exit_code, after_wins.output.strip()) == (0, "SERVING")


def test_a_typed_timeout_before_the_subcommand_beats_digits_timeout():
    with socket.socket() as silent:  # accepts connections, never answers: calls wait it out
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = run("--timeout", "0.5", "health", "--target", target, env={"DIGITS_TIMEOUT": "30"})
        waited = time.monotonic() - started
    assert result.exit_code == 1 and "Deadline" in result.stderr, result.output
    assert waited < 10


# Help and --version.


def test_top_level_help_shows_read_and_the_default_target_and_its_variable():
    result = run("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # as wrapped for any terminal width
    assert "digit-client read " in text
    assert "[env var: DIGITS_TARGET; default: localhost:50051]" in text


def test_model_options_only_where_a_model_is_called():
    for command in ("classify", "read", "info", "bench"):
        assert "--model-version" in run(command, "--help").output, command
    for command in ("health", "models"):
        options = run(command, "--help").output.split("Options:")[1]
        assert "--model" not in options, command
        refused = run(command, "--model", "best")
        assert refused.exit_code == 2 and "No such option '--model'" in refused.output
        before = run("--model", "best", command)
        assert before.exit_code == 2
        assert f"{command} takes no --model; only classify, read" in before.output


def test_version_names_the_package_grpcio_and_protobuf():
    result = run("--version")
    assert result.exit_code == 0
    line = result.output.strip()
    assert line.startswith(f"digit-client {version('digit-recognizer')} (")
    assert f"grpcio {version('grpcio')}" in line and f"protobuf {version('protobuf')}" in line


# The token travels with every command, bench included.


def test_bench_sends_the_token_like_every_other_command(processes, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    model = save(tiny_model(), tmp_path / "tiny.onnx")
    port = processes("--model", str(model), "--auth-token-file", str(token)).wait_serving()
    target = ["--target", f"127.0.0.1:{port}"]
    info = run("info", "--json", *target, "--token-file", str(token))
    assert info.exit_code == 0, info.output
    for protocol in ("digits", "v2"):
        bench = run(
            "bench", *target, "--token-file", str(token), "--count", "20", "--json",
            "--protocol", protocol,
        )  # fmt: skip
        assert bench.exit_code == 0, bench.output
        result = json.loads(bench.output)
        assert result["requests"] == 20 and result["errors"] == {}, result
    refused = run("bench", *target, "--count", "5")
    assert refused.exit_code == 1 and "missing or wrong credentials" in refused.stderr


# `info`: typed JSON, and the card's detector and library versions in the table.


def test_info_json_is_typed(served):
    result = run("info", "--target", served, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["input"]["shape"] == [-1, 784]
    assert info["batching"]["max_message_bytes"] > 0
    assert isinstance(info["batching"]["max_delay_us"], int)
    assert info["dataset"] == DATASET
    assert info["training_config"] == {"epochs": 5, "hidden": [512], "optimizer": "rmsprop"}
    assert "training_config_json" not in info
    assert info["test_accuracy"] == 0.5 and info["labels"] == [str(d) for d in range(10)]


_CARD_IN_MODEL_INFO = {"library_versions", "detector_json"} <= set(
    digits_pb2.ModelInfo.DESCRIPTOR.fields_by_name
)


@pytest.mark.skipif(
    not _CARD_IN_MODEL_INFO,
    reason="ModelInfo has no library_versions / detector_json fields yet (protos/digits.proto)",
)
def test_info_shows_the_detector_and_library_versions(served):
    info = json.loads(run("info", "--target", served, "--json").output)
    assert info["detector"] == DETECTOR and info["library_versions"] == LIBRARIES
    table = run("info", "--target", served).output
    assert "threshold: 0.42" in table and "tensorflow-cpu: 2.21.0" in table


def test_the_servers_digits_model_does_not_pick_the_clients_model(served):
    """In the server's container DIGITS_MODEL is a file path; a client run there asked for a
    model named like that path. The client's own variable is DIGITS_MODEL_NAME."""
    picture = str(REPO / "examples" / "mnist-0-label7.png")
    env = {"DIGITS_TARGET": served, "DIGITS_MODEL": "/models/model.onnx"}
    assert run("classify", picture, env=env).exit_code == 0
    refused = run("classify", picture, env={**env, "DIGITS_MODEL_NAME": "nope"})
    assert refused.exit_code == 1 and "nope" in refused.output


@pytest.mark.parametrize("command", ["classify", "read"])
def test_a_folder_without_pictures_is_an_error_not_silence(command, tmp_path):
    """A script reading nothing and exit 0 would take an empty folder for done."""
    (tmp_path / "notes.txt").write_text("not a picture")
    result = CliRunner().invoke(main, [command, str(tmp_path), "--target", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path}: a folder with no pictures in it\n"
