"""One client, every worker: the client's pool of connections against `--workers N`, and the
server's connection age that moves long-lived clients again, with no failed call."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from digit_recognizer.client import pool as pool_module
from digit_recognizer.client.cli import main
from digit_recognizer.client.client import AsyncDigitClient, DigitClient
from digit_recognizer.client.pool import Pool, Slot, cover_steps
from digit_recognizer.server.app import start_server
from digit_recognizer.server.config import ServerConfig
from digit_recognizer.server.service import DigitClassifierService

from onnx_models import one_hot_image, save, tiny_model
from waiting import until

IMAGE = one_hot_image(3)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """`digit-server --workers 2` with the tiny model: two processes, one port."""
    from processes import ServerProcess

    model = save(tiny_model(), tmp_path_factory.mktemp("pool") / "tiny.onnx")
    server = ServerProcess("--model", str(model), "--workers", "2")
    port = server.wait_serving()
    yield f"127.0.0.1:{port}"
    server.kill()


def spread(counts: Counter[int]) -> float:
    """How far apart the busiest and the least busy worker are, as a share of the busiest."""
    return (max(counts.values()) - min(counts.values())) / max(counts.values())


async def test_the_pool_reaches_both_workers_and_shares_the_calls(two_workers):
    async with AsyncDigitClient(two_workers) as client:
        assert await client.connect() == (0, 1)
        assert client.workers == 2 and client.open_connections == 2
        answered: Counter[int] = Counter()
        # Waves of 8 calls at once: each goes on the connection with the fewest calls in
        # progress, so each wave is shared out evenly whatever the workers' speed (under a
        # steady load a slower worker gets fewer calls, on purpose: docs/performance.md).
        for _ in range(50):
            wave = await asyncio.gather(*(client.classify(IMAGE) for _ in range(8)))
            answered.update(prediction.telemetry.worker for prediction in wave)
    assert set(answered) == {0, 1}, answered
    assert spread(answered) <= 0.2, answered


def test_the_blocking_client_covers_the_workers_from_its_first_call(two_workers):
    with DigitClient(two_workers) as client:
        client.classify(IMAGE)  # starts covering in the background
        assert client.connect() == (0, 1)
        answered = Counter(client.classify(IMAGE).telemetry.worker for _ in range(200))
    assert set(answered) == {0, 1} and spread(answered) <= 0.2, answered


def test_one_connection_pins_one_worker(two_workers):
    with DigitClient(two_workers, connections=1) as client:
        assert client.connect() in ((0,), (1,))
        answered = Counter(client.classify(IMAGE).telemetry.worker for _ in range(100))
        assert client.open_connections == 1
    assert len(answered) == 1, answered


def test_connections_must_be_auto_or_a_count():
    with pytest.raises(ValueError, match="'auto' or a number"):
        DigitClient("127.0.0.1:1", connections=0)
    result = CliRunner().invoke(main, ["bench", "--connections", "many"])
    assert result.exit_code == 2 and "--connections" in result.output


def test_digit_client_bench_uses_every_worker(two_workers):
    result = CliRunner().invoke(
        main, ["--target", two_workers, "bench", "--count", "300", "--concurrency", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["connections"] == 2 and set(report["requests_per_worker"]) == {"0", "1"}


@pytest.fixture
async def aged_pair(tmp_path: Path, monkeypatch):
    """Two servers in this process on one port (SO_REUSEPORT, as --workers 2's processes
    share theirs), worker 0 and 1 of 2, closing connections after 0.25 s. Yields the target
    and the peers (client address:port) each Classify came from."""
    peers: list[str] = []
    classify = DigitClassifierService.Classify

    async def recording(self, request, context):
        peers.append(context.peer())
        return await classify(self, request, context)

    monkeypatch.setattr(DigitClassifierService, "Classify", recording)
    model = save(tiny_model(), tmp_path / "tiny.onnx")
    config = ServerConfig(
        model=model, host="127.0.0.1", port=0, metrics_port=None, plaintext=True,
        provider="cpu", instances=2, max_connection_age_s=0.25, max_connection_age_grace_s=5,
    )  # fmt: skip
    first = await start_server(config, reuse_port=True)
    second = await start_server(replace(config, port=first.port, instance=1), reuse_port=True)
    yield f"127.0.0.1:{first.port}", peers
    await asyncio.gather(first.stop(0), second.stop(0))


async def test_aged_connections_move_and_no_call_fails(aged_pair, monkeypatch):
    """Callers never stop while every connection is closed for its age several times over:
    not one call fails, the connections did move, and the pool still reaches both workers
    (it covers them again when its connections land on one)."""
    target, peers = aged_pair
    monkeypatch.setattr(pool_module, "COVER_INTERVAL_S", 0.1)
    errors: list[Exception] = []
    answered: Counter[int] = Counter()
    async with AsyncDigitClient(target) as client:
        assert await client.connect() == (0, 1)
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                try:
                    answered[(await client.classify(IMAGE)).telemetry.worker] += 1
                except Exception as exc:  # every failure counts, whatever its kind
                    errors.append(exc)

        callers = [asyncio.create_task(caller()) for _ in range(16)]
        # Four ages at least, on each connection: each one opened anew after its GOAWAY.
        await until(lambda: len(set(peers)) >= 8, "connections closed for their age", 20)
        answered.clear()
        await until(lambda: sum(answered.values()) >= 400, "calls after the moves", 20)
        # Connections keep moving every 0.25 s; covering brings one to each worker back.
        await until(lambda: client.reached_workers() == (0, 1), "both workers reached", 20)
        stop.set()
        await asyncio.gather(*callers)
    assert errors == []
    assert set(answered) == {0, 1}, answered


def cover(pool: Pool, where: dict[str, int], lands: list[int]) -> list[Slot]:
    """Drive cover_steps as a client would: `where` says which worker each known connection
    reaches now, `lands` where each new one lands. Returns the slots it says to close."""
    steps = cover_steps(pool)
    try:
        asked = next(steps)
        while True:
            for slot in asked:
                if slot.channel not in where:
                    where[slot.channel] = lands.pop(0)
            asked = steps.send([(where[slot.channel], 2) for slot in asked])
    except StopIteration as done:
        return done.value
    finally:
        pool.covering = False


def test_a_pool_whose_connections_moved_covers_the_workers_again(monkeypatch):
    monkeypatch.setattr(pool_module, "COVER_INTERVAL_S", 0.0)
    pool = Pool(lambda number: Slot(f"connection {number}", None), "auto")
    first = pool.slots[0]
    where: dict[str, int] = {first.channel: 0}
    assert pool.first_call and pool.start_covering()
    closed = cover(pool, where, lands=[0, 1])  # the second lands on 0 again: closed
    assert pool.reached() == (0, 1) and [s.channel for s in closed] == ["connection 2"]
    second = pool.slots[1]
    assert not pool.heard(second, 1, 2)  # where it was: nothing to do

    # The server closed the first for its age; it reconnected, to worker 1. A call on the
    # second is in progress while the pool covers again.
    where[first.channel] = 1
    assert pool.heard(first, 1, 2) and pool.start_covering()
    assert pool.acquire() in (first, second)
    busy = max(pool.slots, key=lambda s: s.outstanding)
    closed = cover(pool, where, lands=[0])
    assert pool.reached() == (0, 1) and len(pool.slots) == 2
    # One of the two on worker 1 retired: closed at once if idle, else when its call ends.
    retired = [s for s in (first, second) if s.retired]
    assert len(retired) == 1
    if retired[0] is busy:
        assert closed == [] and pool.release(busy)
    else:
        assert closed == retired and not pool.release(busy)
