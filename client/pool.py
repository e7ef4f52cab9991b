"""The client's connections: one to each server process, calls balanced over them.

`digit-server --workers N` runs N processes on one port and the kernel (SO_REUSEPORT) hands
each new TCP connection to one of them, blind to load. A gRPC channel holds one connection
per address, so a client with one channel reaches one process however many the server runs.
`Pool` holds several channels instead, each with its own connection, and learns from the
server which process each reaches (`ModelInfo.worker`/`workers`, `Telemetry.worker` on every
reply). With `connections="auto"` it opens connections until it holds one to every process
the server reports (a bounded number of attempts: where a new connection lands is the
kernel's hash), closes the ones that landed on a process already reached, and sends each call
on the connection with the fewest calls in progress. When the server closes a connection for
its age (`grpc.max_connection_age_ms`, which rebalances other clients) the channel reconnects
and may land elsewhere: the replies say so, and the pool covers every process again.

The covering itself is `cover_steps`, free of I/O: it says which connections to ask, the
blocking and asyncio clients ask them their own way. A connection is closed only once no
call of this client is in progress on it, so covering never fails a call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

AUTO = "auto"
Connections = int | Literal["auto"]
# New connections tried per server process before the pool settles for what it reached:
# with 16 processes, reaching each takes ~54 random tries on average (the coupon collector).
ATTEMPTS_PER_WORKER = 8
# A pool whose connections moved (the server aged them out) covers the processes again, at
# most this often: a target whose addresses rotate would otherwise probe on every reply.
COVER_INTERVAL_S = 5.0


@dataclass(eq=False)
class Slot:
    """One channel (one TCP connection per server address) and what is known of it."""

    channel: Any  # grpc.Channel or grpc.aio.Channel
    stub: Any  # DigitClassifierStub on it
    worker: int | None = None  # the server process it reaches, as last heard
    outstanding: int = 0  # this client's calls in progress on it
    retired: bool = False  # no new calls; closed when the last one ends


Info = tuple[int, int]  # (worker, workers) as the server said it: ModelInfo's fields


def parse_connections(value: Connections | str) -> Connections:
    """ "auto" or a count >= 1 (also as text, for the CLI and the environment)."""
    if value == AUTO:
        return "auto"
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"connections must be 'auto' or a number >= 1, got {value!r}") from None
    if count < 1:
        raise ValueError(f"connections must be 'auto' or a number >= 1, got {value!r}")
    return count


class Pool:
    """The slots of one client. Thread-safe when given a lock (the blocking client)."""

    def __init__(
        self,
        open_slot: Callable[[int], Slot],
        connections: Connections,
        lock: threading.Lock | None = None,
    ) -> None:
        self._open_slot = open_slot
        self.auto = connections == AUTO
        self._lock: Any = lock or contextlib.nullcontext()
        self.slots: list[Slot] = []
        self._opened = 0
        for _ in range(1 if connections == AUTO else int(connections)):
            self.slots.append(self.open())
        self.retired: list[Slot] = []
        self.probing: list[Slot] = []  # opened by cover_steps, not yet kept or closed
        self.workers = 0  # as the server reports; 0 = not known yet (or an older server)
        self.closed = False
        self.covering = False  # a cover_steps run is in progress
        self._covered_at: float | None = None  # when the last one started
        self._turn = 0

    @property
    def first_call(self) -> bool:
        """Auto, open, and never covered: the first call starts covering."""
        return self.auto and self._covered_at is None and not self.closed

    def open(self) -> Slot:
        self._opened += 1
        return self._open_slot(self._opened)

    def acquire(self) -> Slot:
        """The slot for the next call: fewest calls in progress; ties taken in turn.

        Fewest in progress rather than strict turns: a process that is slower for a while
        (sharing its core, a large batch from another client) gets fewer calls instead of a
        growing queue. One AsyncDigitClient at 64 callers against --workers 2 on a shared
        2-core box, 4 interleaved rounds: strict turns gave equal counts but p99 135-195 ms,
        fewest in progress 97-116 ms and 0.98-1.35x the requests/s."""
        with self._lock:
            slots = self.slots
            if len(slots) == 1:
                slot = slots[0]
            else:
                self._turn = (self._turn + 1) % len(slots)
                slot = slots[self._turn]
                for other in slots:
                    if other.outstanding < slot.outstanding:
                        slot = other
            slot.outstanding += 1
            return slot

    def release(self, slot: Slot) -> bool:
        """The call on `slot` ended; True when the slot is now to be closed."""
        with self._lock:
            slot.outstanding -= 1
            if slot.retired and slot.outstanding == 0 and slot in self.retired:
                self.retired.remove(slot)
                return True
            return False

    def heard(self, slot: Slot, worker: int, workers: int) -> bool:
        """A reply on `slot` came from process `worker` of `workers`. True when the pool
        should cover the processes again now (its connections moved)."""
        if slot.worker == worker or not workers:
            return False
        moved = slot.worker is not None
        slot.worker, self.workers = worker, workers
        if not (self.auto and moved) or self.covering or self.closed:
            return False
        with self._lock:
            reached = {s.worker for s in self.slots}
        if len(reached) >= min(len(self.slots), workers):
            return False  # moved, but every connection still reaches its own process
        return self._covered_at is None or time.monotonic() - self._covered_at >= COVER_INTERVAL_S

    def start_covering(self) -> bool:
        """True when a cover_steps run should start now (none running, not closed)."""
        with self._lock:
            if self.covering or self.closed:
                return False
            self.covering = True
            self._covered_at = time.monotonic()
            return True

    def reached(self) -> tuple[int, ...]:
        """The server processes this pool's connections reach, as last heard."""
        with self._lock:
            return tuple(sorted({s.worker for s in self.slots if s.worker is not None}))

    def keep(self, slot: Slot) -> None:
        with self._lock:
            if slot in self.probing:  # else the pool was closed meanwhile, and the slot too
                self.probing.remove(slot)
                self.slots.append(slot)

    def retire(self, slot: Slot) -> bool:
        """No new calls on `slot`; True when it can be closed now (nothing in progress)."""
        with self._lock:
            if slot in self.probing:
                self.probing.remove(slot)
                return True
            if slot not in self.slots or len(self.slots) == 1:
                return False
            self.slots.remove(slot)
            slot.retired = True
            if slot.outstanding == 0:
                return True
            self.retired.append(slot)
            return False

    def take_all(self) -> list[Slot]:
        """Closing: every slot, to be closed; the pool opens no more."""
        with self._lock:
            self.closed = True
            everything = [*self.slots, *self.retired, *self.probing]
            self.slots, self.retired, self.probing = [], [], []
            return everything


def cover_steps(pool: Pool) -> Generator[list[Slot], list[Info | None], list[Slot]]:
    """One connection to every server process. Each `yield` gives slots to ask (ModelInfo on
    each) and receives each one's answer, None where the call failed. Returns the slots to
    close (landed on a process already reached); the caller closes them.

    The driver also sets `pool.covering` back to False when this ends, however it ends."""
    to_close: list[Slot] = []
    current = list(pool.slots)
    answers = yield current  # where each connection lands now (they may have moved)
    for slot, answer in zip(current, answers, strict=True):
        if answer is not None:
            slot.worker, pool.workers = answer[0], answer[1] or pool.workers
    workers = pool.workers
    if workers <= 1 or not pool.auto:  # a fixed count: asked only to connect them all
        return to_close
    attempts = ATTEMPTS_PER_WORKER * workers
    while attempts > 0 and not pool.closed:
        missing = workers - len(pool.reached())
        if missing <= 0:
            break
        fresh = []
        with pool._lock:
            if pool.closed:
                break
            for _ in range(min(missing, attempts)):
                fresh.append(pool.open())
            pool.probing.extend(fresh)
        attempts -= len(fresh)
        answers = yield fresh
        for slot, answer in zip(fresh, answers, strict=True):
            if answer is not None and answer[0] not in pool.reached() and not pool.closed:
                slot.worker = answer[0]
                pool.keep(slot)
            elif pool.retire(slot):
                to_close.append(slot)
    # One connection per process: a second one to the same process would get its share of
    # calls and halve everyone else's.
    seen: set[int | None] = set()
    for slot in sorted(list(pool.slots), key=lambda s: s.outstanding, reverse=True):
        if slot.worker in seen and pool.retire(slot):
            to_close.append(slot)
        seen.add(slot.worker)
    return to_close
