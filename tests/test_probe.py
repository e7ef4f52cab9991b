"""`digit-probe`, the container health check: right answers, and cheap on its usual path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DIGIT_PROBE = str(Path(sys.executable).parent / "digit-probe")


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIGITS_")}
    return subprocess.run(
        [DIGIT_PROBE, *args], capture_output=True, text=True, timeout=30,
        env={**clean, **(env or {})},
    )  # fmt: skip


def test_ready_over_http_and_grpc_and_not_ready_when_nothing_listens(processes, tiny_model_path):
    server = processes("--model", str(tiny_model_path), "--http-port", "0")
    grpc_port = server.wait_serving()
    http_port = server.http_port()
    assert probe("--http-port", str(http_port)).returncode == 0
    # In a container the probe shares the server's environment and needs no arguments.
    assert probe(env={"DIGITS_HTTP_PORT": str(http_port)}).returncode == 0
    assert probe("--port", str(grpc_port)).returncode == 0
    server.kill()
    for args in (["--http-port", str(http_port)], ["--port", str(grpc_port)]):
        refused = probe(*args)
        assert refused.returncode == 1
        assert refused.stderr.startswith("not ready: ")


def test_the_http_path_loads_neither_grpc_nor_protobuf():
    # grpc's import alone costs about 0.1 CPU-s, the whole budget of a probe.
    check = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom digit_recognizer.client import probe\n"
         "try:\n    probe.main(['--http-port', '1', '--timeout', '0.5'])\n"
         "except SystemExit:\n    pass\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] in "
         "('grpc', 'google', 'numpy', 'PIL')))"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert check.stdout.strip() == "[]", check.stdout


def test_version():
    done = probe("--version")
    assert done.returncode == 0 and done.stdout.startswith("digit-probe ")
