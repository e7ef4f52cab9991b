"""`digit-server` run as a real process, for tests that need signals or a separate loop.

A thread reads the server's stderr from start to end: the pipe never fills (a chatty server
would block on it), and start-up waits have a deadline that fires even while no line comes.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

DIGIT_SERVER = str(Path(sys.executable).parent / "digit-server")


class ServerProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [DIGIT_SERVER, "--host", "127.0.0.1", "--port", "0", *args]
            + ([] if "--metrics-port" in args else ["--no-metrics"])
            + ([] if "--workers" in args else ["--workers", "1"])  # the default is one per CPU
            + ([] if "--tls-cert" in args else ["--plaintext"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)  # end of output: the process has exited

    def wait_serving(self, count: int = 1, timeout: float = 60) -> int:
        """Read the log until `count` "serving" lines; return the port they share."""
        ports = []
        deadline = time.monotonic() + timeout
        while len(ports) < count:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("server did not start:\n" + "".join(self.log)) from None
            assert line is not None, "server exited during start-up:\n" + "".join(self.log)
            if match := re.search(r" serving .*address=\S+:(\d+)", line):
                ports.append(int(match.group(1)))
        assert len(set(ports)) == 1
        return ports[0]

    def metrics_port(self) -> int:
        for line in self.log:
            if match := re.search(r" metrics address=\S+:(\d+)", line):
                return int(match.group(1))
        raise AssertionError("no metrics line in the log (start with --metrics-port 0)")

    def http_port(self) -> int:
        for line in self.log:
            if match := re.search(r" http_port=(\d+)", line):
                return int(match.group(1))
        raise AssertionError("no http_port in the log (start with --http-port 0)")

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.proc.returncode, "".join(self.log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
