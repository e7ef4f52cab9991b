"""Reading numbers off the event loop: worker processes, a deadline per read, and an end to
the work when the caller leaves.

Finding the digits is Python and numpy over a whole picture (a second or two at most, since
pieces are capped): in a thread it holds the GIL in long stretches and stalls every other
caller of the event loop, so each read runs in a worker process, at most `workers` at once.
A process cannot be asked to drop a task, so a read whose deadline passes, or whose caller
disconnects, has its worker killed; the next read forks a fresh one from multiprocessing's
fork server (milliseconds: numpy, Pillow, scipy and this module are imported there once).
Forking the server itself is not an option: gRPC's threads do not survive a fork.

`Readers` is the server's side; `serve` and `run`, below it, the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import multiprocessing
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TypeAlias

import grpc
import numpy as np

from digit_recognizer.client.errors import ImageError
from digit_recognizer.client.reading import Cut, find_digits
from digit_recognizer.server.errors import Expired, ServingError

# Seconds one read may take in its worker (a --read-timeout-s flag would set it). The
# slowest picture within the piece limit takes about 2 s on one core.
READ_TIMEOUT_S = 10.0
# How often a running read asks whether its caller is still connected: the work stops within
# this much of a disconnect.
CALLER_CHECK_S = 0.1

_context = multiprocessing.get_context("forkserver")
# What the fork server imports once for every worker: what reads, and the main module
# (digit-server's script: 50 ms of imports), which each worker would import again otherwise.
_PRELOAD = ["__main__", "digit_recognizer.server.reader", "scipy.ndimage"]


class ReadAbandoned(ServingError):
    """The caller disconnected while its picture was read; nobody receives this."""

    code = grpc.StatusCode.CANCELLED


class Readers:
    """At most `workers` reads at once, each in a worker process of its own."""

    def __init__(self, workers: int) -> None:
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[_Worker] = []
        self._closed = False

    async def read(
        self,
        data: bytes,
        name: str,
        max_decoded_bytes: int,
        max_pieces: int,
        caller_gone: Callable[[], bool],
        timeout_s: float | None = None,
    ) -> Found:
        """find_digits(data, ...) in a worker: its ImageError raised here, Expired past
        `timeout_s` (READ_TIMEOUT_S), ReadAbandoned once `caller_gone()`; the worker is
        killed in both."""
        timeout_s = READ_TIMEOUT_S if timeout_s is None else timeout_s
        job = Job(data, name, max_decoded_bytes, max_pieces)
        async with self._slots:
            # Started in a thread: the first start waits for the fork server's imports.
            worker = self._idle.pop() if self._idle else await asyncio.to_thread(_Worker)
            try:
                reply = await worker.run(job, timeout_s, caller_gone)
            except BaseException:  # expired, abandoned, cancelled, or the worker died
                worker.kill()
                raise
            if self._closed:
                worker.kill()
            else:
                self._idle.append(worker)
        if isinstance(reply, Found):
            return reply
        if isinstance(reply, Exception):
            raise reply  # the picture's fault: an ImageError naming it
        raise RuntimeError(f"reading {name} failed in the worker:\n{reply}")

    def close(self) -> None:
        """Stop the idle workers; busy ones are killed when their read ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().kill()


class _Worker:
    def __init__(self) -> None:
        _context.set_forkserver_preload(_PRELOAD)  # used when the fork server starts
        self._connection, theirs = _context.Pipe()
        self._process: BaseProcess = _context.Process(
            target=serve, args=(theirs,), name="digit-reader", daemon=True
        )
        self._process.start()
        theirs.close()  # theirs is the worker's now: its exit is our end's EOF

    async def run(self, job: Job, timeout_s: float, caller_gone: Callable[[], bool]) -> Reply:
        loop = asyncio.get_running_loop()
        self._connection.send(job)  # the worker is waiting for it: one copy of the upload
        answered = loop.create_future()

        def readable() -> None:
            if not answered.done():
                answered.set_result(None)

        fd = self._connection.fileno()
        loop.add_reader(fd, readable)
        deadline = loop.time() + timeout_s
        try:
            while not answered.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Expired(
                        f"{job.name}: reading the picture took over {timeout_s:g} s, this "
                        "server's limit per picture"
                    )
                if caller_gone():
                    raise ReadAbandoned(f"{job.name}: the caller disconnected")
                await asyncio.wait([answered], timeout=min(CALLER_CHECK_S, remaining))
        finally:
            loop.remove_reader(fd)
        try:
            reply: Reply = self._connection.recv()
        except (EOFError, OSError):
            await asyncio.to_thread(self._process.join, 1.0)  # for its exit code
            raise RuntimeError(
                f"the read worker ended while reading {job.name} (exit code "
                f"{self._process.exitcode})"
            ) from None
        return reply

    def kill(self) -> None:
        """SIGKILL, not waited for: the fork server, its parent, reaps it."""
        self._connection.close()
        with contextlib.suppress(ProcessLookupError, ValueError):
            self._process.kill()


# The worker's side.


@dataclass(frozen=True)
class Job:
    data: bytes  # the picture as uploaded
    name: str
    max_decoded_bytes: int
    max_pieces: int


@dataclass(frozen=True)
class Found:
    """A picture's pieces (with the other ways to cut it and its layout's verdict), and the
    pixels of each piece a Classify asks about (`pieces.asked()`) as the JSON of the HTTP
    answer (rounded to 3 places): written here, off the server's event loop."""

    pieces: Cut
    pixels_json: list[str]


# What a job comes back as: what was found, the caller's mistake (an ImageError: the picture
# cannot be read, or holds too many pieces), or a bug (its traceback, for the server's log).
Reply: TypeAlias = Found | ImageError | str


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def serve(connection: Connection) -> None:
    # Ctrl-C reaches the whole process group; the server alone decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A picture's arrays (megabytes each) from mmap, given back when freed: glibc otherwise
    # keeps them in the heap (an idle worker: 181 MB after five big pictures, 110 MB with it).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    while True:
        try:
            job = connection.recv()
            connection.send(run(job))
        except (EOFError, OSError):  # the server closed the pipe, or is gone
            return


def run(job: Job) -> Reply:
    try:
        cut = find_digits(job.data, job.name, job.max_decoded_bytes, job.max_pieces)
        shown = np.round([piece.pixels.astype(np.float64) for piece in cut.asked()], 3)
        return Found(cut, [json.dumps(row) for row in shown.tolist()])
    except ImageError as exc:
        return exc
    except Exception:
        return traceback.format_exc()
