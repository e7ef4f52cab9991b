"""Dynamic batching: concurrent requests grouped into one model run. Pure asyncio, no gRPC.

`submit(images)` queues N images and resolves to their N output rows. One worker task forms
batches from the head of the queue: up to `max_batch_size` images, waiting at most
`max_delay_us` after the oldest queued image for more to arrive (0: run what is waiting as
soon as the model is free, so an idle server adds no latency). A request larger than the room
left in a batch is split across consecutive batches and reassembled in order.

Short runs (expected to take at most `inline_max_us`, judged from the time the last run
spent in the model) execute on the event loop's own thread: for them the hand-off to a worker
thread (a wake-up each way plus a GIL hand-back while the loop is busy) costs more than the
run itself.
Longer runs, the first run, and the first after a swap go to the worker thread, so the loop
keeps receiving requests while onnxruntime (which releases the GIL) computes, and a slow
model never stalls the loop. When nothing is queued or running and the run is short, `submit`
computes at once in its caller's turn: what the worker would do next, minus two task switches.

The queue is bounded in images (`max_queue_size`): past it `submit` raises `Overloaded` at
once. Callers that cancelled, or whose deadline passed while queued, are skipped and never
computed. A failed model run fails every caller in it with `BatchFailed`; the worker goes on.

`swap(predict, version)` replaces the model between two runs (hot reload): every run uses
exactly one version, and each result lists the version(s) that computed it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from digit_recognizer.server.errors import BatchFailed, Expired, NotServing, Overloaded

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BatcherLimits:
    max_batch_size: int = 256
    max_delay_us: int = 0
    max_queue_size: int = 4096
    inline_max_us: int = 250  # runs expected to be this short stay on the loop; 0 = never

    def validate(self) -> list[str]:
        """Problems as "<field> must ...", one per line; empty when the limits are usable."""
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_delay_us < 0:
            problems.append(f"max_delay_us must be >= 0, got {self.max_delay_us}")
        if self.max_queue_size < 1:
            problems.append(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        if self.inline_max_us < 0:
            problems.append(f"inline_max_us must be >= 0, got {self.inline_max_us}")
        return problems


@dataclass(frozen=True)
class BatchResult:
    outputs: np.ndarray  # one row per submitted image, in order
    batch_size: int  # the largest model run these images took part in
    batches: int  # how many model runs they were spread over
    queue_us: int  # arrival to first model run
    compute_us: int  # time inside model runs
    versions: tuple[str, ...] = ()  # model versions that ran it; two only across a swap

    @property
    def version(self) -> str:
        """What replies report as the model version: "2", or "1,2" across a hot swap."""
        return ",".join(self.versions)


@dataclass(frozen=True)
class BatchEvent:
    """Reported to the observer after every model run (metrics)."""

    size: int
    compute_us: int
    failed: bool


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future[BatchResult]
    deadline: float | None  # loop.time() seconds
    enqueued: float
    taken: int = 0  # images handed to batches so far
    parts: list[np.ndarray] = field(default_factory=list)
    first_run: float | None = None
    largest_batch: int = 0
    batches: int = 0
    compute_s: float = 0.0
    versions: list[str] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.images) - self.taken


class Batcher:
    def __init__(
        self,
        predict: Predict,
        limits: BatcherLimits,
        *,
        executor: Executor | None = None,
        on_batch: Callable[[BatchEvent], None] | None = None,
        on_skip: Callable[[str], None] | None = None,
        version: str = "",
    ) -> None:
        problems = limits.validate()
        if problems:
            raise ValueError("; ".join(problems))
        self._predict = predict
        self._version = version
        self.limits = limits
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._owns_executor = executor is None
        self._on_batch = on_batch or (lambda _event: None)
        self._on_skip = on_skip or (lambda _reason: None)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._worker: asyncio.Task[None] | None = None
        self._last_run: tuple[int, float] | None = None  # (images, seconds in predict)
        self._running = False  # a model run is in progress (awaited on the worker thread)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def version(self) -> str:
        return self._version

    def swap(self, predict: Predict, version: str) -> None:
        """Use another model from the next run on; the run in progress finishes on the old."""
        self._predict, self._version = predict, version
        self._last_run = None  # its speed is unknown until it has run once

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> BatchResult:
        """Queue `images` (N, ...) and wait for their outputs. `deadline` is in loop.time()."""
        if not self._accepting:
            raise NotServing("the server is shutting down and accepts no new requests")
        n = len(images)
        if n == 0:
            raise ValueError("submit needs at least one image")
        if self._queued_images + n > self.limits.max_queue_size:
            raise Overloaded(
                f"queue full ({self._queued_images} of {self.limits.max_queue_size} images "
                f"waiting, this request adds {n}); retry after a back-off"
            )
        loop = asyncio.get_running_loop()
        if self._can_run_now(n, deadline, loop.time()):
            return self._run_now(images)
        pending = _Pending(images, loop.create_future(), deadline, loop.time())
        self._queue.append(pending)
        self._queued_images += n
        self._wakeup.set()
        return await pending.future

    async def close(self) -> None:
        """Stop accepting, finish everything already accepted, then stop the worker."""
        self._accepting = False
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_dead(loop.time())
            if not self._queue:
                if not self._accepting:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_fill(loop)
            batch = self._take_batch(loop.time())
            if batch:
                await self._execute(batch, loop)

    async def _wait_for_fill(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.limits.max_delay_us == 0:
            return
        flush_at = self._queue[0].enqueued + self.limits.max_delay_us / 1e6
        while self._queued_images < self.limits.max_batch_size and self._accepting:
            timeout = flush_at - loop.time()
            if timeout <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return

    def _drop_dead(self, now: float) -> None:
        """Forget callers that are gone: cancelled, or out of time while queued."""
        if not any(self._is_dead(p, now) for p in self._queue):
            return
        alive: collections.deque[_Pending] = collections.deque()
        for pending in self._queue:
            if self._is_dead(pending, now):
                self._queued_images -= pending.remaining
                self._expire(pending)
            else:
                alive.append(pending)
        self._queue = alive

    @staticmethod
    def _is_dead(pending: _Pending, now: float) -> bool:
        return pending.future.done() or (pending.deadline is not None and now >= pending.deadline)

    def _expire(self, pending: _Pending) -> None:
        if pending.future.done():
            self._on_skip("cancelled")
        else:
            self._on_skip("deadline")
            pending.future.set_exception(
                Expired("deadline passed while queued; the images were not computed")
            )

    def _take_batch(self, now: float) -> list[tuple[_Pending, int, int]]:
        """Segments (pending, start, stop) filling one batch from the head of the queue."""
        self._drop_dead(now)
        room = self.limits.max_batch_size
        segments = []
        while self._queue and room > 0:
            pending = self._queue[0]
            count = min(room, pending.remaining)
            segments.append((pending, pending.taken, pending.taken + count))
            pending.taken += count
            self._queued_images -= count
            room -= count
            if pending.remaining == 0:
                self._queue.popleft()
        return segments

    async def _execute(
        self, segments: list[tuple[_Pending, int, int]], loop: asyncio.AbstractEventLoop
    ) -> None:
        predict, version = self._predict, self._version  # one version for the whole run
        inputs = [pending.images[start:stop] for pending, start, stop in segments]
        batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        started = loop.time()
        for pending, _, _ in segments:
            if pending.first_run is None:
                pending.first_run = started
        self._running = True
        try:
            if self._runs_inline(len(batch)):
                outputs, run_s = _timed(predict, batch)
            else:
                outputs, run_s = await loop.run_in_executor(self._executor, _timed, predict, batch)
        except Exception:
            error = self._failed_run(len(batch), loop.time() - started)
            for pending, _, _ in segments:
                self._fail(pending, error)
            return
        finally:
            self._running = False
        elapsed = loop.time() - started
        self._last_run = (len(batch), run_s)
        self._on_batch(BatchEvent(len(batch), _us(elapsed), failed=False))
        offset = 0
        for pending, start, stop in segments:
            count = stop - start
            pending.parts.append(outputs[offset : offset + count])
            offset += count
            pending.largest_batch = max(pending.largest_batch, len(batch))
            pending.batches += 1
            pending.compute_s += elapsed
            if version not in pending.versions:
                pending.versions.append(version)
            if stop == len(pending.images) and not pending.future.done():
                pending.future.set_result(self._result(pending))

    def _can_run_now(self, images: int, deadline: float | None, now: float) -> bool:
        """Nothing queued, nothing running, a short run: the worker would run exactly these
        images next, so the caller runs them itself and skips two task switches."""
        return (
            not self._queue
            and not self._running
            and images <= self.limits.max_batch_size
            and (deadline is None or now < deadline)
            and self._runs_inline(images)
        )

    def _run_now(self, images: np.ndarray) -> BatchResult:
        version = self._version
        started = time.perf_counter()
        try:
            outputs, run_s = _timed(self._predict, images)
        except Exception:
            raise self._failed_run(len(images), time.perf_counter() - started) from None
        self._last_run = (len(images), run_s)
        self._on_batch(BatchEvent(len(images), _us(run_s), failed=False))
        return BatchResult(outputs, len(images), 1, 0, _us(run_s), (version,))

    def _failed_run(self, images: int, elapsed_s: float) -> BatchFailed:
        log.exception("model run on a batch of %d images failed", images)
        self._on_batch(BatchEvent(images, _us(elapsed_s), failed=True))
        # The cause goes to the log above, not to callers: it may hold paths or internals.
        return BatchFailed(f"model run failed on a batch of {images} images; the server logged why")

    def _runs_inline(self, images: int) -> bool:
        """Whether a run of `images` is expected to fit in `inline_max_us`, judging from the
        last run: no slower for fewer images, proportionally slower for more."""
        if self._last_run is None:
            return False
        last_images, last_s = self._last_run
        expected_s = last_s * max(1.0, images / last_images)
        return expected_s * 1e6 <= self.limits.inline_max_us

    def _fail(self, pending: _Pending, error: Exception) -> None:
        if pending in self._queue:  # the rest of a split request must not run either
            self._queue.remove(pending)
            self._queued_images -= pending.remaining
        if not pending.future.done():
            pending.future.set_exception(error)

    @staticmethod
    def _result(pending: _Pending) -> BatchResult:
        parts = pending.parts
        return BatchResult(
            outputs=parts[0] if len(parts) == 1 else np.concatenate(parts),
            batch_size=pending.largest_batch,
            batches=pending.batches,
            queue_us=_us((pending.first_run or pending.enqueued) - pending.enqueued),
            compute_us=_us(pending.compute_s),
            versions=tuple(pending.versions),
        )


def _timed(predict: Predict, batch: np.ndarray) -> tuple[np.ndarray, float]:
    """Checked outputs and the seconds spent in `predict` itself, without any hand-off."""
    started = time.perf_counter()
    outputs = predict(batch)
    if len(outputs) != len(batch):
        raise RuntimeError(f"model returned {len(outputs)} rows for {len(batch)} images")
    return outputs, time.perf_counter() - started


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))
