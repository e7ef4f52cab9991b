"""Starting, probing, metering and stopping the servers under test, each a process tree."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

from bench.load import UNARY_METHODS, Load, build_request

PEERS_DIR = Path(__file__).parent / "peers"
READY_TIMEOUT_S = 180.0


class ServerFailed(RuntimeError):
    """A server under test did not come up; the message ends with the tail of its log."""


@dataclass(frozen=True)
class Server:
    """How to run one server under test. `protocol` is what the load generator speaks to it:
    "digits" (digits.v1 Classify/ClassifyStream) or "v2" (Open Inference Protocol)."""

    name: str
    command: tuple[str, ...]
    protocol: str
    model_name: str  # what v2 requests address
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    answers: bool = True  # False for the floor: its fixed reply is not worth checking
    http_port: int | None = None  # where REST loads go (ours: --http-port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_cpu_s(process: psutil.Process) -> float:
    """CPU seconds (user + system) of a process and all its live descendants."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


class Running:
    """A started server: its process tree, port and log."""

    def __init__(self, server: Server, port: int, log_path: Path) -> None:
        self.server = server
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            list(server.command),
            env={**os.environ, **server.env},
            cwd=server.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.process = psutil.Process(self.proc.pid)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_target(self) -> str:
        if self.server.http_port is None:
            raise ServerFailed(f"{self.server.name} serves no REST")
        return f"127.0.0.1:{self.server.http_port}"

    def cpu_s(self) -> float:
        return tree_cpu_s(self.process)

    def wait_ready(self, images: np.ndarray, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Block until one real request succeeds; the seconds that took."""
        call = "infer" if self.server.protocol == "v2" else "classify"
        probe = Load(self.target, call, 1, 1, 0, 0, 0, "", model_name=self.server.model_name)
        request = build_request(probe, images[:1])
        started = time.monotonic()
        with grpc.insecure_channel(self.target) as channel:
            unary = channel.unary_unary(UNARY_METHODS[call])
            while True:
                if self.proc.poll() is not None:
                    raise ServerFailed(f"{self.server.name} exited: {self.log_tail()}")
                try:
                    unary(request, timeout=2)
                    return time.monotonic() - started
                except grpc.RpcError as exc:
                    if time.monotonic() - started > timeout_s:
                        raise ServerFailed(
                            f"{self.server.name} not ready after {timeout_s:.0f} s "
                            f"({exc.code().name}): {self.log_tail()}"
                        ) from None
                    time.sleep(0.25)

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the whole tree, then SIGKILL what is left after 20 s."""
        members = [self.process]
        with contextlib.suppress(psutil.NoSuchProcess):
            members += self.process.children(recursive=True)
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        _, alive = psutil.wait_procs(members, timeout=20)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(alive, timeout=5)
        self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def running(server: Server, port: int, log_dir: Path, images: np.ndarray) -> Iterator[Running]:
    log_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in server.name).strip("-")
    started = Running(server, port, log_dir / f"{slug}.log")
    try:
        started.wait_ready(images)
        yield started
    finally:
        started.stop()


# The servers. Each function returns the Server and the port its load goes to.


def ours(name: str, model: Path, model_name: str, port: int, *flags: str) -> Server:
    digit_server = str(Path(sys.executable).parent / "digit-server")
    command = (digit_server, "--model", str(model), "--host", "127.0.0.1", "--port", str(port))
    http_port = free_port()  # the REST loads' (v2 rest bulk, JSON and binary tensors)
    return Server(
        name,
        (*command, "--plaintext", "--metrics-port", "0", "--log-level", "WARNING",
         "--http-port", str(http_port), *flags),
        "digits",
        model_name,
        http_port=http_port,
    )  # fmt: skip


def floor(port: int) -> Server:
    return Server(
        "bare grpc.aio (floor)",
        (sys.executable, "-m", "bench.floor", "--port", str(port)),
        "digits",
        "",
        answers=False,
        cwd=str(Path(__file__).parent.parent),
    )


def kserve(python: Path, model: Path, model_name: str, port: int) -> Server:
    return Server(
        "KServe 0.21",
        (str(python), str(PEERS_DIR / "kserve_server.py")),
        "v2",
        model_name,
        env={
            "BENCH_MODEL": str(model.resolve()),
            "BENCH_MODEL_NAME": model_name,
            "BENCH_GRPC_PORT": str(port),
            "BENCH_HTTP_PORT": str(free_port()),
            "KSERVE_LOGLEVEL": "WARNING",  # INFO logs every call
        },
    )


MLSERVER_MAX_BATCH_SIZE = 64
MLSERVER_MAX_BATCH_TIME_S = 0.001


def mlserver(
    python: Path, model: Path, model_name: str, port: int, parallel_workers: int, workdir: Path
) -> Server:
    """MLServer reads its settings from files in the directory it starts in."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEERS_DIR / "mlserver_runtime.py", workdir)
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "grpc_port": port,
        "http_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": parallel_workers,
    }
    (workdir / "settings.json").write_text(json.dumps(settings))
    (workdir / "model").mkdir(exist_ok=True)
    model_settings = {
        "name": model_name,
        "implementation": "mlserver_runtime.OnnxDigits",
        "max_batch_size": MLSERVER_MAX_BATCH_SIZE,
        "max_batch_time": MLSERVER_MAX_BATCH_TIME_S,
        "parameters": {"uri": str(model.resolve())},
    }
    (workdir / "model" / "model-settings.json").write_text(json.dumps(model_settings))
    return Server(
        f"MLServer 1.7.1 (parallel workers {parallel_workers})",
        (str(python.parent / "mlserver"), "start", "."),
        "v2",
        model_name,
        cwd=str(workdir),
    )


def pytriton(python: Path, model: Path, model_name: str, port: int) -> Server:
    libdir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return Server(
        "Triton 2.51 (PyTriton 0.7)",
        (
            str(python),
            str(PEERS_DIR / "pytriton_server.py"),
            str(model.resolve()),
            model_name,
            str(port),
            str(free_port()),
            str(free_port()),
        ),
        "v2",
        model_name,
        env={"LD_LIBRARY_PATH": libdir, "TMPDIR": tempfile.gettempdir()},
    )
