"""`digit-server` run as a real process, for tests that need signals or a separate loop."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

DIGIT_SERVER = str(Path(sys.executable).parent / "digit-server")


class ServerProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [DIGIT_SERVER, "--host", "127.0.0.1", "--port", "0", *args]
            + ([] if "--metrics-port" in args else ["--no-metrics"])
            + ([] if "--tls-cert" in args else ["--plaintext"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []

    def wait_serving(self, count: int = 1, timeout: float = 60) -> int:
        """Read the log until `count` "serving" lines; return the port they share."""
        ports = []
        deadline = time.monotonic() + timeout
        while len(ports) < count:
            assert time.monotonic() < deadline, "server did not start:\n" + "".join(self.log)
            line = self.proc.stderr.readline()
            assert line, "server exited during start-up:\n" + "".join(self.log)
            self.log.append(line)
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
        _, rest = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.log) + rest

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
