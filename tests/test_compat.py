"""The client installs where its users already are: under the oldest grpcio/protobuf that
pyproject.toml admits, and in one environment with kserve and a current tritonclient (both pin
protobuf < 7). Each environment is a cached venv (bench/venvs.py) holding this checkout as an
editable install; the checks run there against a real server from this project's venv."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from bench import venvs

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "mnist-0-label7.png"
FLOORED = ("grpcio", "grpcio-health-checking", "grpcio-status", "protobuf")


def floors() -> dict[str, str]:
    """The lowest version pyproject.toml admits for each library the stubs depend on."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(,.*)?", requirement.replace(" ", ""))
        if match and match[1] in FLOORED:
            found[match[1]] = match[2]
    assert set(found) == set(FLOORED), f"no floor found for {set(FLOORED) - set(found)}"
    return found


def venv_python(name: str, *requirements: str) -> Path:
    try:
        return venvs.peer_python(name, *requirements, "-e", str(REPO), timeout_s=600)
    except venvs.VenvError as exc:
        # Loud on purpose: a resolution failure here is the bug this module exists to catch.
        pytest.fail(str(exc))


def run(python: Path, *args: str) -> str:
    done = subprocess.run(
        [str(python), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


VERSIONS = """
import json, sys, warnings
warnings.simplefilter("error")  # a protobuf gencode/runtime warning fails the check
from importlib.metadata import version
import digit_recognizer.client
from digit_recognizer.protos import digits_pb2_grpc
for module in sys.argv[1:]:
    __import__(module)
names = ["grpcio", "grpcio-health-checking", "grpcio-status", "protobuf"]
names += [m.split(".")[0] for m in sys.argv[1:] if not m.startswith("digit_recognizer")]
print(json.dumps({n: version(n) for n in names}))
"""


def classify_through(python: Path, port: int) -> None:
    client = python.parent / "digit-client"
    target = f"127.0.0.1:{port}"
    assert (
        "SERVING"
        in subprocess.run(
            [str(client), "health", "--target", target], capture_output=True, text=True, timeout=60
        ).stdout
    )
    answer = subprocess.run(
        [str(client), "classify", "--target", target, "--json", str(EXAMPLE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    assert "digit" in answer.stdout


def test_the_stubs_and_client_work_under_the_declared_floors(processes, tiny_model_path):
    pins = floors()
    python = venv_python("floors", *(f"{name}=={version}" for name, version in pins.items()))
    seen = json.loads(run(python, "-c", VERSIONS, "digit_recognizer.protos.inference_pb2_grpc"))
    assert seen == pins  # the floors really were what ran
    server = processes("--model", str(tiny_model_path))
    classify_through(python, server.wait_serving())


def test_the_client_installs_beside_kserve_and_an_unpinned_tritonclient(processes, tiny_model_path):
    python = venv_python("beside-kserve-triton", "kserve==0.21.0", "tritonclient[grpc,http]")
    # kserve's and tritonclient's stubs both define package `inference`, so those two cannot
    # share a process; ours can share one with either: the client never loads our OIP stubs.
    seen = json.loads(run(python, "-c", VERSIONS, "kserve"))
    assert seen["kserve"] == "0.21.0"
    seen = json.loads(run(python, "-c", VERSIONS, "tritonclient.grpc", "tritonclient.http"))
    # Unpinned, pip used to settle on tritonclient 2.41 (2023) to satisfy our protobuf floor.
    assert tuple(int(p) for p in seen["tritonclient"].split(".")[:2]) >= (2, 60)
    server = processes("--model", str(tiny_model_path))
    classify_through(python, server.wait_serving())
