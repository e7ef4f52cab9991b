"""JSON infer bodies (Open Inference Protocol REST) parsed where they cannot stall the event loop.

`json.loads` and turning its lists into arrays hold the GIL: on the loop, or in a thread, a
7 MB body of 1,024 images held every other caller 0.25-0.65 s, and a hostile 16.8 MB one (5,349
images, refused only once parsed) 1.1-2.4 s and +215 MB. So a body over INLINE_BYTES is parsed
in a worker process (one, started when the first such body comes), at most MAX_PARSING at
once (past them 429); the worker also counts the values against the image limit and hands
back only arrays and the small rest of the JSON, which that limit and MAX_REST_BYTES bound.
Smaller bodies (one image is 7-16 KB) are parsed here: ~2 ms, less than the hand-off.

`JsonBodies` is the server's side; `parse_infer`, below it, runs in either place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from digit_recognizer.protos.contract import PIXELS_PER_IMAGE
from digit_recognizer.server.errors import InvalidInput, Overloaded, cut, first_line
from digit_recognizer.server.validation import to_images

log = logging.getLogger(__name__)
INLINE_BYTES = 64 * 1024
MAX_PARSING = 4  # bodies handed to the worker at once (one parsed, the others queued)
# The JSON besides the inputs' data (names, shapes, parameters, outputs): what comes back from
# the worker as Python objects, whose unpickling holds the loop like parsing would.
MAX_REST_BYTES = 64 * 1024
# What one value may take in JSON: Python's repr of a float32 ("0.10000000149011612") and
# ", ". A body over max_images * 784 of them cannot be a request this server takes.
JSON_BYTES_PER_VALUE = 24
BINARY_HINT = (
    "send the tensors as binary data (the Inference-Header-Content-Length header, as "
    "tritonclient does) or use gRPC"
)


def max_json_bytes(max_images: int) -> int:
    """The largest JSON infer body for `max_images` images, with room for everything else."""
    return max_images * PIXELS_PER_IMAGE * JSON_BYTES_PER_VALUE + MAX_REST_BYTES


class JsonBodies:
    """Parses infer bodies: small ones at once, big ones in the worker process."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._parsing = 0

    async def parse(self, data: bytes, charset: str | None, max_images: int) -> dict[str, Any]:
        """`parse_infer`, here or in the worker; InvalidInput for the caller's mistakes,
        Overloaded when MAX_PARSING bodies are in the worker's hands already."""
        if len(data) <= INLINE_BYTES:
            return parse_infer(data, charset, max_images)
        if self._parsing >= MAX_PARSING:
            raise Overloaded(
                f"{MAX_PARSING} large JSON bodies are being parsed already; retry after a "
                f"back-off, or {BINARY_HINT}"
            )
        self._parsing += 1
        try:
            if self._pool is None:
                # spawn: forking would copy gRPC's threads (they do not survive a fork), and
                # the fork server is the number reader's, with its own preloads.
                self._pool = ProcessPoolExecutor(
                    1, multiprocessing.get_context("spawn"), initializer=_worker_started
                )
            # submit() starts the worker the first time: in a thread, not on the loop.
            future = await asyncio.to_thread(
                self._pool.submit, parse_infer, data, charset, max_images
            )
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            log.error("the JSON worker process ended; starting another for the next body")
            self.close()
            raise RuntimeError("the JSON worker process ended while parsing a body") from None
        finally:
            self._parsing -= 1

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


# Runs in the worker (or, for small bodies, in the server).


def _worker_started() -> None:
    # Ctrl-C reaches the whole process group; the server alone decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def parse_infer(data: bytes, charset: str | None, max_images: int) -> dict[str, Any]:
    """An infer body's JSON object, each input's "data" made a flat float32 array. Refused
    (InvalidInput) when it is not a JSON object, when a data is not numbers, when the inputs
    hold more than `max_images` images' values, or when the rest is over MAX_REST_BYTES."""
    body = loads(data, charset)
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    inputs = body.get("inputs")
    for index, item in enumerate(inputs if isinstance(inputs, list) else []):
        if isinstance(item, dict) and "data" in item:
            values = numbers(str(item.get("name", "")), item["data"])
            if values.size > max_images * PIXELS_PER_IMAGE:  # the same refusal as later on
                to_images(f"inputs[{index}].data", values, max_images, check_range=False)
            item["data"] = values
    rest = json.dumps(body, default=lambda _array: None)
    if len(rest) > MAX_REST_BYTES:
        raise InvalidInput(
            f"the JSON besides the inputs' data is {len(rest)} bytes, over the "
            f"{MAX_REST_BYTES} this server reads"
        )
    return body


def loads(data: bytes, charset: str | None) -> Any:
    """json.loads, its failures the caller's InvalidInput (as one line: never the document)."""
    try:
        return json.loads(data.decode(charset or "utf-8"))
    except RecursionError:
        raise InvalidInput("the body is not JSON this server reads (nested too deep)") from None
    except LookupError as exc:  # an unknown charset
        raise InvalidInput(f"the body's charset is unknown ({first_line(exc, 200)})") from None
    except ValueError as exc:  # not JSON, not UTF-8, an integer of thousands of digits
        raise InvalidInput(f"the body is not JSON ({first_line(exc, 200)})") from None


def numbers(name: str, data: Any) -> np.ndarray:
    """JSON numbers (nested lists allowed) -> flat float32; strings and booleans refused."""
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):  # ragged lists, integers beyond any dtype
        array = np.asarray([], dtype=object)
    if array.dtype.kind not in "iuf" or (array.size == 0 and data not in ([], ())):
        raise InvalidInput(f"input {cut(name)!r}: data must be a (nested) list of numbers")
    return array.astype(np.float32).ravel()
