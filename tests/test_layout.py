"""The server's structure, checked: fronts are siblings over the data plane, the server does
not need the trainer, and the input contract's numbers live in one module."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRONTS = {"service", "oip", "http"}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_no_front_imports_another(front):
    imported = imported_modules(REPO / "server" / f"{front}.py")
    others = {f"digit_recognizer.server.{other}" for other in FRONTS - {front}}
    assert not imported & others


def test_the_server_does_not_import_the_trainer():
    for path in (REPO / "server").glob("*.py"):
        assert not any(m.startswith("digit_recognizer.trainer") for m in imported_modules(path))


def test_784_is_spelled_only_in_the_contract():
    """As a number in code; prose in docstrings and messages may say 784."""
    offenders = []
    for folder in ("server", "client", "trainer", "protos", "bench"):
        for path in (REPO / folder).glob("*.py"):
            if path.name == "contract.py" or "_pb2" in path.name:
                continue
            tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            offenders += [
                f"{path.name}:{t.start[0]}"
                for t in tokens
                if t.type == tokenize.NUMBER and t.string == "784"
            ]
    assert not offenders


def test_the_wheel_is_typed_and_adds_no_generic_top_level_names(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("digit_recognizer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n} == {
        "digit_recognizer"
    }
    for package in ("client", "server", "trainer", "protos"):  # PEP 561: type checkers use us
        assert f"digit_recognizer/{package}/py.typed" in names
    assert "digit_recognizer/protos/digits_pb2.pyi" in names
