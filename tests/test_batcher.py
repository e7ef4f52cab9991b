"""The batcher with fake models; synchronisation by events, never by sleeping."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from digit_recognizer.server import batcher as batching
from digit_recognizer.server.batcher import Batcher, BatcherLimits, BatchEvent, RunPolicy
from digit_recognizer.server.errors import BatchFailed, Expired, NotServing, Overloaded

from waiting import until


class FakeModel:
    """Doubles its input. `hold()` makes the next run block until `release()`."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self._gate = threading.Event()
        self._gate.set()
        self._loop = asyncio.get_running_loop()
        self.running = asyncio.Event()
        self.fail_with: Exception | None = None
        self.drop_a_row = False

    def hold(self) -> None:
        self._gate.clear()
        self.running.clear()

    def release(self) -> None:
        self._gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.copy())
        self._loop.call_soon_threadsafe(self.running.set)
        assert self._gate.wait(timeout=10), "test never released the model"
        if self.fail_with is not None:
            raise self.fail_with
        return (batch * 2)[: len(batch) - 1 if self.drop_a_row else None]


def ids(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(-1, 1)


@pytest.fixture
async def model():
    return FakeModel()


class Clock:
    """The batcher's clock, moved only by the test: what a run or a wait measures is what the
    test says it took, however busy the machine is. (No deadlines with it: those are in loop
    time, which this clock is not.)"""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(batching, "_clock", clock)
    return clock


async def make(model, **limits) -> Batcher:
    """Every run on the worker thread unless a test says otherwise: the gated fake model
    blocks its caller, which must not be the event loop."""
    limits.setdefault("inline_max_us", 0)
    batcher = Batcher(model, BatcherLimits(**limits))
    batcher.start()
    return batcher


async def test_idle_server_runs_a_single_request_at_once(model):
    batcher = await make(model, max_batch_size=8, max_delay_us=0)
    result = await batcher.submit(ids(3))
    assert result.outputs.tolist() == [[6.0]]
    assert (result.batch_size, result.batches) == (1, 1)
    await batcher.close()


async def test_short_runs_move_to_the_loop_thread_once_measured_and_long_ones_never(clock):
    threads: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        threads.append(threading.get_ident())
        clock.advance(0.02 if batch[0, 0] < 0 else 0.001)  # slow: 20 ms, past the 10 ms budget
        return batch * 2

    batcher = Batcher(predict, BatcherLimits(max_batch_size=8, inline_max_us=10_000))
    batcher.start()
    for value in (1, 2, 3):
        assert (await batcher.submit(ids(value))).outputs.item() == value * 2
    loop_thread = threading.get_ident()
    # The first run is measured on the worker thread; the model proved fast, so the next
    # ones stay on the loop.
    assert threads[0] != loop_thread and threads[1:] == [loop_thread, loop_thread]
    await batcher.submit(ids(-1))  # runs inline (unknown to be slow), measured slow
    await batcher.submit(ids(-1))
    assert threads[-2:] == [loop_thread, threads[0]]
    await batcher.submit(ids(1))  # the slow run is the last measured: still off the loop
    assert threads[-1] != loop_thread
    batcher.swap(predict, "2")  # a new model is measured again, off the loop
    await batcher.submit(ids(4))
    assert threads[-1] != loop_thread
    await batcher.close()


async def test_an_idle_batcher_runs_a_short_request_in_the_callers_own_task():
    tasks: list[asyncio.Task | None] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        try:
            tasks.append(asyncio.current_task())
        except RuntimeError:  # no loop in this thread: the worker thread
            tasks.append(None)
        return batch * 2

    batcher = Batcher(predict, BatcherLimits(inline_max_us=1_000_000))
    batcher.start()
    await batcher.submit(ids(1))  # unknown speed: measured on the worker thread
    result = await batcher.submit(ids(2))
    assert tasks == [None, asyncio.current_task()]
    assert (result.outputs.item(), result.queue_us, result.batches) == (4, 0, 1)
    await batcher.close()


async def test_a_failing_inline_run_fails_its_callers_and_the_worker_goes_on():
    failures = iter([None, RuntimeError("boom")])

    def predict(batch: np.ndarray) -> np.ndarray:
        if (error := next(failures, None)) is not None:
            raise error
        return batch * 2

    batcher = Batcher(predict, BatcherLimits(inline_max_us=1_000_000))
    batcher.start()
    assert (await batcher.submit(ids(1))).outputs.item() == 2  # measured: fast
    with pytest.raises(BatchFailed):
        await batcher.submit(ids(1))  # inline, raises
    assert (await batcher.submit(ids(5))).outputs.item() == 10
    await batcher.close()


def test_the_run_policy_goes_inline_only_for_runs_known_to_be_short():
    policy = RunPolicy(inline_max_us=250)
    assert not policy.inline(1)  # speed unknown: the worker thread
    policy.ran(4, 100e-6)
    assert policy.inline(1) and policy.inline(4)  # fewer images: assumed no faster
    assert policy.inline(10) and not policy.inline(11)  # more: proportionally slower
    policy.forget()  # another model
    assert not policy.inline(1)
    never = RunPolicy(inline_max_us=0)
    never.ran(1, 1e-9)
    assert not never.inline(1)


async def test_compute_time_is_time_in_the_model_on_the_worker_path_too(clock):
    """A run whose result waits for a busy loop: the wait is not compute time."""
    started, finish = threading.Event(), threading.Event()

    def predict(batch: np.ndarray) -> np.ndarray:
        started.set()
        assert finish.wait(timeout=10)
        clock.advance(0.003)  # the model's own 3 ms
        return batch

    worker = ThreadPoolExecutor(1)
    batcher = Batcher(
        predict, BatcherLimits(inline_max_us=0), executor=worker, on_batch=(events := []).append
    )
    batcher.start()
    submitted = asyncio.ensure_future(batcher.submit(ids(1)))
    await until(started.is_set, "the run to start")
    finish.set()
    # The loop stays busy until the run has ended on the worker thread (the one worker takes
    # this no-op after it), then a second more, before it takes the result.
    worker.submit(lambda: None).result(timeout=10)
    clock.advance(1.0)
    result = await submitted
    assert result.compute_us == 3_000 and events[0].compute_us == 3_000
    await batcher.close()
    worker.shutdown()


def test_limits_refuse_a_negative_inline_budget():
    assert BatcherLimits(inline_max_us=-1).validate() == ["inline_max_us must be >= 0, got -1"]


async def test_flushes_when_the_batch_is_full_without_waiting_the_delay(model):
    batcher = await make(model, max_batch_size=4, max_delay_us=60_000_000)
    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(ids(i)) for i in range(4))), timeout=10
    )
    assert [r.outputs.item() for r in results] == [0, 2, 4, 6]
    assert [len(c) for c in model.calls] == [4]
    assert all(r.batch_size == 4 for r in results)
    await batcher.close()


async def test_flushes_after_the_delay_when_the_batch_stays_small(model):
    batcher = await make(model, max_batch_size=64, max_delay_us=2_000)
    results = await asyncio.wait_for(
        asyncio.gather(batcher.submit(ids(1)), batcher.submit(ids(2))), timeout=10
    )
    assert [len(c) for c in model.calls] == [2]
    assert [r.outputs.item() for r in results] == [2, 4]
    await batcher.close()


async def test_the_delay_merges_a_request_arriving_later_and_bounds_the_wait(model):
    batcher = await make(model, max_batch_size=64, max_delay_us=50_000)
    started = time.perf_counter()
    first = asyncio.ensure_future(batcher.submit(ids(1)))
    await asyncio.sleep(0.001)  # arrives 1 ms after the first: still within its delay
    second = asyncio.ensure_future(batcher.submit(ids(2)))
    results = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    waited = time.perf_counter() - started
    assert [len(c) for c in model.calls] == [2]  # one run (without the delay: two)
    assert [r.outputs.item() for r in results] == [2, 4]
    assert 0.045 <= waited < 1.0, waited  # the full delay from the oldest, and no longer
    await batcher.close()


async def test_requests_arriving_during_a_run_form_the_next_batch_in_order(model):
    batcher = await make(model, max_batch_size=16)
    model.hold()
    first = asyncio.ensure_future(batcher.submit(ids(1)))
    await model.running.wait()
    rest = [asyncio.ensure_future(batcher.submit(ids(10 + i, 20 + i))) for i in range(3)]
    await asyncio.sleep(0)  # let the submits enqueue; no timing involved
    assert batcher.queued_images == 6
    model.release()
    await first
    outputs = [(await r).outputs.ravel().tolist() for r in rest]
    assert outputs == [[20, 40], [22, 42], [24, 44]]
    assert model.calls[1].ravel().tolist() == [10, 20, 11, 21, 12, 22]
    await batcher.close()


async def test_runs_take_the_largest_preferred_size_the_queue_fills(model):
    # Triton's dynamic_batching.preferred_batch_size (config.pbtxt): 11 queued with preferred
    # 4 and 8 run as 8 then 3; without preferred sizes they would run as one batch of 11.
    batcher = await make(model, max_batch_size=16, preferred_batch_sizes=(4, 8))
    model.hold()
    first = asyncio.ensure_future(batcher.submit(ids(0)))
    await model.running.wait()
    rest = [asyncio.ensure_future(batcher.submit(ids(i))) for i in range(1, 12)]
    await asyncio.sleep(0)  # let the submits enqueue; no timing involved
    assert batcher.queued_images == 11
    model.release()
    await asyncio.wait_for(asyncio.gather(first, *rest), timeout=10)
    assert [len(c) for c in model.calls] == [1, 8, 3]
    await batcher.close()


async def test_a_preferred_size_reached_runs_without_waiting_out_the_delay(model):
    batcher = await make(
        model, max_batch_size=64, max_delay_us=60_000_000, preferred_batch_sizes=(4,)
    )
    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(ids(i)) for i in range(4))), timeout=10
    )
    assert [len(c) for c in model.calls] == [4] and len(results) == 4
    await batcher.close()


async def test_large_requests_are_split_across_batches_and_reassembled(model):
    batcher = await make(model, max_batch_size=4, max_queue_size=100)
    values = np.arange(10, dtype=np.float32).reshape(-1, 1)
    result = await batcher.submit(values)
    assert result.outputs.ravel().tolist() == (values.ravel() * 2).tolist()
    assert [len(c) for c in model.calls] == [4, 4, 2]
    assert (result.batches, result.batch_size) == (3, 4)
    await batcher.close()


async def test_a_failed_run_fails_every_caller_in_it_and_the_next_batch_works(model):
    batcher = await make(model, max_batch_size=8)
    model.hold()
    blocker = asyncio.ensure_future(batcher.submit(ids(0)))
    await model.running.wait()
    model.fail_with = RuntimeError("onnxruntime exploded")
    victims = [asyncio.ensure_future(batcher.submit(ids(i))) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    model.release()
    with pytest.raises(BatchFailed):
        await blocker
    for victim in victims:
        with pytest.raises(BatchFailed, match="model run failed on a batch of 3 images"):
            await victim
    model.fail_with = None
    assert (await batcher.submit(ids(5))).outputs.item() == 10
    await batcher.close()


async def test_a_failed_run_fails_only_its_callers_while_others_wait():
    """Images of more than one value, as every real one is (784)."""
    started, go = threading.Event(), threading.Event()

    def predict(batch: np.ndarray) -> np.ndarray:
        started.set()
        assert go.wait(timeout=10)
        if batch[0, 0] == 1:
            raise RuntimeError("onnxruntime exploded")
        return batch * 2

    batcher = Batcher(predict, BatcherLimits(max_batch_size=2, inline_max_us=0))
    batcher.start()
    doomed = asyncio.ensure_future(batcher.submit(ids(1, 2)))
    await until(started.is_set, "the doomed run to start")
    waiting = asyncio.ensure_future(batcher.submit(ids(3, 4)))
    await asyncio.sleep(0)  # let it enqueue
    assert batcher.queued_images == 2
    go.set()
    # Bounded: with the worker dead nobody is ever answered.
    done, _ = await asyncio.wait([doomed, waiting], timeout=2)
    assert done == {doomed, waiting}, "callers left unanswered"
    with pytest.raises(BatchFailed):
        doomed.result()
    assert waiting.result().outputs.ravel().tolist() == [6, 8]
    await batcher.close()


async def test_wrong_output_length_is_a_failed_batch(model, caplog):
    batcher = await make(model)
    model.drop_a_row = True
    with pytest.raises(BatchFailed, match="model run failed on a batch of 2 images"):
        await batcher.submit(ids(1, 2))
    assert "model returned 1 rows for 2 images" in caplog.text
    await batcher.close()


async def test_a_failed_part_of_a_split_request_stops_the_rest(model):
    batcher = await make(model, max_batch_size=2)
    model.fail_with = RuntimeError("boom")
    with pytest.raises(BatchFailed):
        await batcher.submit(ids(1, 2, 3, 4, 5))
    assert len(model.calls) == 1 and batcher.queued_images == 0
    await batcher.close()


async def test_cancelled_callers_are_never_computed(model):
    skipped: list[str] = []
    batcher = Batcher(
        model, BatcherLimits(max_batch_size=8, inline_max_us=0), on_skip=skipped.append
    )
    batcher.start()
    model.hold()
    blocker = asyncio.ensure_future(batcher.submit(ids(0)))
    await model.running.wait()
    doomed = asyncio.ensure_future(batcher.submit(ids(99, 98)))
    kept = asyncio.ensure_future(batcher.submit(ids(7)))
    await asyncio.sleep(0)
    assert batcher.queued_images == 3
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    assert batcher.queued_images == 1  # at once, not when the next batch forms
    model.release()
    await blocker
    assert (await kept).outputs.item() == 14
    assert all(99 not in call for call in model.calls)
    assert skipped == ["cancelled"] and batcher.queued_images == 0
    await batcher.close()


async def test_expired_callers_get_deadline_exceeded_and_are_never_computed(model):
    skipped: list[str] = []
    batcher = Batcher(
        model, BatcherLimits(max_batch_size=8, inline_max_us=0), on_skip=skipped.append
    )
    batcher.start()
    model.hold()
    blocker = asyncio.ensure_future(batcher.submit(ids(0)))
    await model.running.wait()
    loop = asyncio.get_running_loop()
    expired = asyncio.ensure_future(batcher.submit(ids(99), deadline=loop.time()))
    alive = asyncio.ensure_future(batcher.submit(ids(3), deadline=loop.time() + 60))
    await asyncio.sleep(0)
    model.release()
    await blocker
    with pytest.raises(Expired, match="not computed"):
        await expired
    assert (await alive).outputs.item() == 6
    assert all(99 not in call for call in model.calls) and skipped == ["deadline"]
    await batcher.close()


async def test_expired_callers_make_room_before_anyone_is_refused(model):
    batcher = await make(model, max_batch_size=8, max_queue_size=4)
    model.hold()
    blocker = asyncio.ensure_future(batcher.submit(ids(0)))
    await model.running.wait()
    loop = asyncio.get_running_loop()
    expiring = asyncio.ensure_future(batcher.submit(ids(1, 2, 3), deadline=loop.time() + 0.01))
    await asyncio.sleep(0.02)  # past its deadline: a time to wait out, not synchronisation
    accepted = asyncio.ensure_future(batcher.submit(ids(4, 5, 6)))
    await asyncio.sleep(0)
    assert batcher.queued_images == 3
    model.release()
    await blocker
    with pytest.raises(Expired):
        await expiring
    assert (await accepted).outputs.ravel().tolist() == [8, 10, 12]
    await batcher.close()


async def test_full_queue_rejects_at_once_and_accepted_work_completes(model):
    batcher = await make(model, max_batch_size=8, max_queue_size=4)
    model.hold()
    blocker = asyncio.ensure_future(batcher.submit(ids(0)))
    await model.running.wait()  # the blocker left the queue: 0 of 4 queued
    accepted = asyncio.ensure_future(batcher.submit(ids(1, 2, 3)))
    await asyncio.sleep(0)
    with pytest.raises(
        Overloaded, match=r"queue full \(3 of 4 images waiting, this request adds 2\)"
    ):
        await batcher.submit(ids(4, 5))
    model.release()
    await blocker
    assert (await accepted).outputs.ravel().tolist() == [2, 4, 6]
    assert (await batcher.submit(ids(4, 5))).outputs.ravel().tolist() == [8, 10]
    await batcher.close()


async def test_close_finishes_accepted_work_then_refuses_new(model):
    events: list[BatchEvent] = []
    batcher = Batcher(
        model, BatcherLimits(max_batch_size=2, inline_max_us=0), on_batch=events.append
    )
    batcher.start()
    model.hold()
    accepted = [asyncio.ensure_future(batcher.submit(ids(i))) for i in range(5)]
    await model.running.wait()
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)
    with pytest.raises(NotServing):
        await batcher.submit(ids(9))
    model.release()
    await closing
    assert [(await a).outputs.item() for a in accepted] == [0, 2, 4, 6, 8]
    assert sum(e.size for e in events) == 5 and not any(e.failed for e in events)


async def test_telemetry_reports_queue_and_compute_time(model, clock):
    batcher = await make(model)
    model.hold()
    blocker = asyncio.ensure_future(batcher.submit(ids(0)))
    await model.running.wait()
    waiting = asyncio.ensure_future(batcher.submit(ids(1)))
    await asyncio.sleep(0)  # let it enqueue
    assert batcher.queued_images == 1
    clock.advance(0.01)  # the held run takes 10 ms
    model.release()
    held = await blocker
    result = await waiting
    # The blocker's 10 ms are compute time; the waiter waited as long: queue time, and its
    # own run took no time.
    assert (held.compute_us, held.queue_us) == (10_000, 0)
    assert (result.queue_us, result.compute_us) == (10_000, 0)
    await batcher.close()


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        Batcher(lambda x: x, BatcherLimits(max_batch_size=0))
