"""Cached virtual environments for the peers' own software: KServe, MLServer, PyTriton and the
Triton clients pin libraries (protobuf, uvloop, fastapi) that must never enter this project's
environment, so each lives in a venv of its own, created once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "digit-recognizer"


class VenvError(RuntimeError):
    """A peer's venv could not be created; the message ends with pip's own words."""


def peer_python(name: str, *requirements: str, timeout_s: float = 900) -> Path:
    """The interpreter of venv `peer-NAME` holding `requirements`, installed on first use.

    The requirement list is part of the cache key, so changing a pin rebuilds the venv."""
    venv = CACHE / f"peer-{name}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = "\n".join(requirements)
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *requirements],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    if install.returncode:
        raise VenvError(f"cannot install {' '.join(requirements)}: {install.stderr.strip()[-400:]}")
    stamp.write_text(wanted)
    return python
