"""Dynamic batching: concurrent requests grouped into one model run. Pure asyncio, no gRPC.

`submit(images)` queues N images and resolves to their N output rows. One worker task forms
batches from the head of the queue: up to `max_batch_size` images, waiting at most
`max_delay_us` after the oldest queued image for more to arrive (0: run what is waiting as
soon as the model is free, so an idle server adds no latency). A request larger than the room
left in a batch is split across consecutive batches and reassembled in order.

Where a run executes is the `RunPolicy`'s call: short runs (expected to take at most
`inline_max_us`, judged from the time the last run spent in the model) execute on the event
loop's own thread, because for them the hand-off to a worker thread (a wake-up each way plus a
GIL hand-back while the loop is busy) costs more than the run itself. Longer runs, the first
run, and the first after a swap go to the worker thread, so the loop keeps receiving requests
while onnxruntime (which releases the GIL) computes, and a slow model never stalls the loop.
When nothing is queued or running and the run is short, `submit` computes at once in its
caller's turn: what the worker would do next, minus two task switches. All three ways share
one execution path and one clock (`time.monotonic`, which is also asyncio's `loop.time()`):
`queue_us` runs from arrival to the start of the first run, `compute_us` is time inside the
model only, measured where the model runs.

The queue is bounded in images (`max_queue_size`): past it `submit` raises `Overloaded` at
once. Callers that cancelled, or whose deadline passed while queued, are skipped and never
computed; a cancelled caller's images stop counting against the bound at once, an expired
one's as soon as a batch forms or room is needed. A failed model run fails every caller in
it with `BatchFailed`; the worker goes on.

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
from typing import Any

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
    # Triton's preferred_batch_size: a batch of the largest of these that the queue can fill
    # runs at once (without waiting out max_delay_us); failing that, what is queued runs.
    preferred_batch_sizes: tuple[int, ...] = ()

    def problems(self) -> list[tuple[str, str]]:
        """(field, "must ...") for every unusable limit; empty when the limits are usable."""
        problems = []
        if self.max_batch_size < 1:
            problems.append(("max_batch_size", f"must be at least 1, got {self.max_batch_size}"))
        if self.max_delay_us < 0:
            problems.append(("max_delay_us", f"must be >= 0, got {self.max_delay_us}"))
        if self.max_queue_size < 1:
            problems.append(("max_queue_size", f"must be at least 1, got {self.max_queue_size}"))
        if self.inline_max_us < 0:
            problems.append(("inline_max_us", f"must be >= 0, got {self.inline_max_us}"))
        if any(not 1 <= size <= self.max_batch_size for size in self.preferred_batch_sizes):
            problems.append(
                (
                    "preferred_batch_sizes",
                    f"must be in 1..max_batch_size, got {list(self.preferred_batch_sizes)}",
                )
            )
        return problems

    def validate(self) -> list[str]:
        """The problems as "<field> must ...", one per line."""
        return [f"{field} {problem}" for field, problem in self.problems()]


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
    """Reported to the observer after every model run (metrics, traces)."""

    size: int
    compute_us: int
    failed: bool
    started_s: float = 0.0  # on the batcher's clock
    callers: tuple[Any, ...] = ()  # the `trace` each served caller submitted with


class RunPolicy:
    """Whether the next run executes on the event loop thread (inline) or the worker thread.

    A run is inline when it is expected to take at most `inline_max_us`, judging from the last
    run: no slower for fewer images, proportionally slower for more. Until a model has run
    once (at start, after a swap) its speed is unknown and runs go to the worker thread.
    """

    def __init__(self, inline_max_us: int) -> None:
        self._inline_max_s = inline_max_us / 1e6
        self._last: tuple[int, float] | None = None  # (images, seconds in the model)

    def inline(self, images: int) -> bool:
        if self._last is None:
            return False
        last_images, last_s = self._last
        return last_s * max(1.0, images / last_images) <= self._inline_max_s

    def ran(self, images: int, seconds: float) -> None:
        self._last = (images, seconds)

    def forget(self) -> None:
        self._last = None


@dataclass(frozen=True)
class _Run:
    """What one model run produced, measured where it ran."""

    outputs: np.ndarray | None
    seconds: float  # inside the model
    error: Exception | None = None


@dataclass(eq=False)  # identity: `in` on the queue must not compare the images
class _Pending:
    images: np.ndarray
    future: asyncio.Future[BatchResult]
    deadline: float | None  # loop.time() seconds
    enqueued: float
    trace: Any = None  # opaque to the batcher: handed to the observer with each run
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
        if problems := limits.validate():
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
        self._policy = RunPolicy(limits.inline_max_us)
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
        self._policy.forget()  # its speed is unknown until it has run once

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(
        self, images: np.ndarray, deadline: float | None = None, trace: Any = None
    ) -> BatchResult:
        """Queue `images` (N, ...) and wait for their outputs. `deadline` is in loop.time();
        `trace` is passed back in the BatchEvent of every run that computes them."""
        if not self._accepting:
            raise NotServing("the server is shutting down and accepts no new requests")
        n = len(images)
        if n == 0:
            raise ValueError("submit needs at least one image")
        if self._queued_images + n > self.limits.max_queue_size:
            self._drop_dead(_clock())  # expired callers free their room before anyone is refused
        if self._queued_images + n > self.limits.max_queue_size:
            raise Overloaded(
                f"queue full ({self._queued_images} of {self.limits.max_queue_size} images "
                f"waiting, this request adds {n}); retry after a back-off"
            )
        loop = asyncio.get_running_loop()
        now = _clock()
        pending = _Pending(images, loop.create_future(), deadline, now, trace)
        if self._can_run_now(n, deadline, now):
            # Done before the await below, which then returns without a task switch.
            pending.taken = n
            segments = [(pending, 0, n)]
            run = self._start(segments, now)
            self._finish(segments, now, *run, _timed(self._predict, images))
            return await pending.future
        self._queue.append(pending)
        self._queued_images += n
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._forget(pending)  # its room in the queue is free at once
            raise

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
            self._drop_dead(_clock())
            if not self._queue:
                if not self._accepting:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_fill()
            segments = self._take_batch(_clock())
            if segments:
                await self._execute(segments, loop)

    async def _wait_for_fill(self) -> None:
        if self.limits.max_delay_us == 0:
            return
        flush_at = self._queue[0].enqueued + self.limits.max_delay_us / 1e6
        full = max(self.limits.preferred_batch_sizes, default=self.limits.max_batch_size)
        while self._queued_images < full and self._accepting:
            timeout = flush_at - _clock()
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

    def _forget(self, pending: _Pending) -> None:
        """A caller gone while queued: its images stop counting now; the worker drops it."""
        self._queued_images -= pending.remaining
        pending.taken = len(pending.images)

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
        queued = min(self._queued_images, room)
        if fitting := [size for size in self.limits.preferred_batch_sizes if size <= queued]:
            room = max(fitting)  # the largest preferred size the queue fills
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
        started = _clock()
        predict, version, batch = self._start(segments, started)
        self._running = True
        try:
            if self._policy.inline(len(batch)):
                run = _timed(predict, batch)
            else:
                run = await loop.run_in_executor(self._executor, _timed, predict, batch)
        finally:
            self._running = False
        self._finish(segments, started, predict, version, batch, run)

    def _start(
        self, segments: list[tuple[_Pending, int, int]], started: float
    ) -> tuple[Predict, str, np.ndarray]:
        """The model (one version for the whole run) and the batch; marks the run's start."""
        inputs = [pending.images[start:stop] for pending, start, stop in segments]
        batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        for pending, _, _ in segments:
            if pending.first_run is None:
                pending.first_run = started
        return self._predict, self._version, batch

    def _finish(
        self,
        segments: list[tuple[_Pending, int, int]],
        started: float,
        predict: Predict,
        version: str,
        batch: np.ndarray,
        run: _Run,
    ) -> None:
        """Hand every caller in the run its rows, or the run's failure."""
        callers = tuple(pending.trace for pending, _, _ in segments)
        failed = run.error is not None
        self._on_batch(BatchEvent(len(batch), _us(run.seconds), failed, started, callers))
        if run.outputs is None:
            log.error("model run on a batch of %d images failed", len(batch), exc_info=run.error)
            # The cause goes to the log, not to callers: it may hold paths or internals.
            error = BatchFailed(
                f"model run failed on a batch of {len(batch)} images; the server logged why"
            )
            for pending, _, _ in segments:
                self._fail(pending, error)
            return
        if predict is self._predict:  # not a run of a model swapped out meanwhile
            self._policy.ran(len(batch), run.seconds)
        offset = 0
        for pending, start, stop in segments:
            count = stop - start
            pending.parts.append(run.outputs[offset : offset + count])
            offset += count
            pending.largest_batch = max(pending.largest_batch, len(batch))
            pending.batches += 1
            pending.compute_s += run.seconds
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
            and self._policy.inline(images)
        )

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


def _clock() -> float:
    """The batcher's one clock; asyncio's loop.time() reads the same one, so deadlines given
    in loop time compare directly."""
    return time.monotonic()


def _timed(predict: Predict, batch: np.ndarray) -> _Run:
    """Run the model where this is called (loop or worker thread) and time only the model."""
    started = _clock()
    try:
        outputs = predict(batch)
        if len(outputs) != len(batch):
            raise RuntimeError(f"model returned {len(outputs)} rows for {len(batch)} images")
    except Exception as exc:
        return _Run(None, _clock() - started, exc)
    return _Run(outputs, _clock() - started)


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))
