"""Regenerate the committed stubs: `python -m digit_recognizer.protos.generate` (make protos).

protoc's virtual include path (`digit_recognizer/protos=protos`) makes the generated modules
import each other as `digit_recognizer.protos.*`, matching the installed package layout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("digits.proto", "inference.proto", "model_config.proto")
PACKAGE_PATH = Path("digit_recognizer/protos")


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs of every .proto into out_dir; return their paths."""
    with tempfile.TemporaryDirectory() as scratch:
        for proto in PROTO_FILES:
            # A child process: protoc's C++ protobuf must not share a process with another
            # copy of it (TensorFlow's, once loaded, makes the in-process compiler crash).
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "grpc_tools.protoc",  # dev-only dependency
                    f"--proto_path={PACKAGE_PATH}={PROTO_DIR}",
                    f"--python_out={scratch}",
                    f"--pyi_out={scratch}",
                    f"--grpc_python_out={scratch}",
                    str(PROTO_DIR / proto),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"protoc failed on {proto}: {result.stderr.strip()}")
        written = []
        for generated in sorted((Path(scratch) / PACKAGE_PATH).iterdir()):
            target = out_dir / generated.name
            shutil.copyfile(generated, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(f"wrote {path}")
